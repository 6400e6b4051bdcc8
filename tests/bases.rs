//! The base-image allow-list against a fake upstream: images built on an
//! allowed base pass, others are denied with how close they came, base tags
//! that move keep their earlier digests (across refreshes and restarts).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{error_code, noise, Fake, FaultKind, Proxy};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pushes an image for `arch` with these layers; returns (digest, size).
fn image(
    fake: &Fake,
    repo: &str,
    tag: Option<&str>,
    arch: &str,
    layers: &[Bytes],
) -> (String, usize) {
    let digests: Vec<String> = layers.iter().map(|l| fake.put_blob(l.clone())).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": digests},
    }))
    .unwrap();
    let config_digest = fake.put_blob(config.clone());
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers.iter().zip(&digests).map(|(l, d)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let size = manifest.len();
    (fake.put_manifest(repo, tag, OCI_MANIFEST, manifest), size)
}

fn index(fake: &Fake, repo: &str, tag: &str, children: &[(&str, &(String, usize))]) -> String {
    let bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": children.iter().map(|(arch, (d, size))| serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": d, "size": size,
            "platform": {"os": "linux", "architecture": arch},
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    fake.put_manifest(repo, Some(tag), OCI_INDEX, bytes)
}

fn config(dir: &std::path::Path, fake: &Fake, extra_storage: &str) -> String {
    format!(
        r#"
[storage]
path = "{path}"
tag_ttl = "0s"
{extra_storage}

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[bases]
distroless = ["docker.io/distroless/static:nonroot"]

[[policy]]
name = "on distroless"
match = ["docker.io/acme/**"]
bases = ["distroless"]

[[policy]]
name = "rest"
match = ["**"]
"#,
        path = dir.join("data").display(),
        url = fake.url(),
    )
}

fn layer(n: u64) -> Bytes {
    noise(64, n)
}

async fn digest_of(proxy: &Proxy, path: &str) -> Result<String, serde_json::Value> {
    let r = proxy.get(path).await;
    if r.status() == 200 {
        return Ok(r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned());
    }
    Err(error_code(r).await.2)
}

#[tokio::test]
async fn images_on_an_allowed_base_pass_and_others_are_denied_with_how_close_they_came() {
    let fake = Fake::start().await;
    let (base, _) = image(
        &fake,
        "distroless/static",
        Some("nonroot"),
        "amd64",
        &[layer(1), layer(2)],
    );
    let (good, _) = image(
        &fake,
        "acme/app",
        Some("good"),
        "amd64",
        &[layer(1), layer(2), layer(10)],
    );
    image(
        &fake,
        "acme/app",
        Some("other"),
        "amd64",
        &[layer(7), layer(10)],
    );
    image(
        &fake,
        "acme/app",
        Some("partial"),
        "amd64",
        &[layer(1), layer(9)],
    );
    let (_, bad_layers) = fake.put_image("acme/app", "unused", &[layer(20)]);
    image(
        &fake,
        "acme/app",
        Some("base-only"),
        "amd64",
        &[layer(1), layer(2)],
    );
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::with_config(dir.clone(), &config(dir.path(), &fake, "")).await;

    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/good")
            .await
            .unwrap(),
        good
    );
    // The base itself passes (the same manifest, tagged in acme/).
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/base-only")
            .await
            .unwrap(),
        base
    );

    for (tag, closest) in [
        ("other", "first 0 of 2 layers match distroless"),
        ("partial", "first 1 of 2 layers match distroless"),
    ] {
        let v = digest_of(&proxy, &format!("/v2/acme/app/manifests/{tag}"))
            .await
            .unwrap_err();
        let e = &v["errors"][0];
        assert_eq!(e["code"], "DENIED");
        assert_eq!(e["detail"]["reasons"][0], "base-not-allowed", "{tag}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("not built on an allowed base image"), "{msg}");
        assert!(msg.contains(closest), "{msg}");
        assert!(msg.contains("allowed bases: distroless"), "{msg}");
    }
    // A denied image's layers are refused by digest; an approved one's served.
    let r = proxy
        .get(&format!("/v2/acme/app/blobs/{}", bad_layers[0]))
        .await;
    assert_eq!(r.status(), 403);
    let r = proxy
        .get(&format!("/v2/acme/app/blobs/{}", common::sha(&layer(10))))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(proxy.metric("pullgate_base_images "), 1.0);
    // The base manifest was fetched once, at start-up, not per verdict.
    assert_eq!(
        fake.hits("GET", &format!("/v2/distroless/static/manifests/{base}")),
        0
    );
    assert_eq!(
        fake.hits("GET", "/v2/distroless/static/manifests/nonroot"),
        1
    );
}

#[tokio::test]
async fn a_base_tag_that_moves_keeps_its_earlier_digests_across_refreshes_and_restarts() {
    let fake = Fake::start().await;
    image(
        &fake,
        "distroless/static",
        Some("nonroot"),
        "amd64",
        &[layer(1)],
    );
    let (old_app, _) = image(
        &fake,
        "acme/app",
        Some("old"),
        "amd64",
        &[layer(1), layer(10)],
    );
    let (new_app, _) = image(
        &fake,
        "acme/app",
        Some("new"),
        "amd64",
        &[layer(2), layer(10)],
    );
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let text = config(dir.path(), &fake, "");
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/old")
            .await
            .unwrap(),
        old_app
    );
    assert!(digest_of(&proxy, "/v2/acme/app/manifests/new")
        .await
        .is_err());

    // The base is rebuilt: its tag now points at other layers.
    image(
        &fake,
        "distroless/static",
        Some("nonroot"),
        "amd64",
        &[layer(2)],
    );
    proxy.app.refresh_bases().await;
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/new")
            .await
            .unwrap(),
        new_app
    );
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/old")
            .await
            .unwrap(),
        old_app
    );
    let history = std::fs::read_to_string(dir.path().join("data/bases/history.json")).unwrap();
    assert_eq!(history.matches("sha256:").count(), 2, "{history}");

    // A restart with the base's upstream failing: both still pass, from the
    // history and the store.
    let dir = proxy.stop().await;
    fake.fault(None, "/v2/distroless/", FaultKind::Status(503), None);
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/old")
            .await
            .unwrap(),
        old_app
    );
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/new")
            .await
            .unwrap(),
        new_app
    );
    let dir = proxy.stop().await;
    fake.clear_faults();

    // base_keep = 1: only the newest digest stays allowed.
    let proxy = Proxy::with_config(dir.clone(), &config(dir.path(), &fake, "base_keep = 1")).await;
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/new")
            .await
            .unwrap(),
        new_app
    );
    let v = digest_of(&proxy, "/v2/acme/app/manifests/old")
        .await
        .unwrap_err();
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "base-not-allowed");
}

#[tokio::test]
async fn bases_that_cannot_be_resolved_fail_closed() {
    let fake = Fake::start().await;
    image(
        &fake,
        "acme/app",
        Some("v1"),
        "amd64",
        &[layer(1), layer(10)],
    );
    fake.fault(None, "/v2/distroless/", FaultKind::Status(503), None);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::with_config(dir.clone(), &config(dir.path(), &fake, "")).await;
    let v = digest_of(&proxy, "/v2/acme/app/manifests/v1")
        .await
        .unwrap_err();
    assert_eq!(
        v["errors"][0]["detail"]["reasons"][0], "verification-unavailable",
        "{v}"
    );
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("distroless"),
        "{v}"
    );
    assert!(proxy.metric("pullgate_base_refreshes_total{result=\"error\"}") >= 1.0);
    // Once the upstream answers and a refresh ran, the verdict is reached.
    fake.clear_faults();
    image(
        &fake,
        "distroless/static",
        Some("nonroot"),
        "amd64",
        &[layer(1)],
    );
    proxy.app.refresh_bases().await;
    assert!(digest_of(&proxy, "/v2/acme/app/manifests/v1").await.is_ok());
}

#[tokio::test]
async fn multi_arch_bases_compare_each_platform_with_its_own() {
    let fake = Fake::start().await;
    let amd = image(&fake, "distroless/static", None, "amd64", &[layer(1)]);
    let arm = image(&fake, "distroless/static", None, "arm64", &[layer(2)]);
    index(
        &fake,
        "distroless/static",
        "nonroot",
        &[("amd64", &amd), ("arm64", &arm)],
    );

    let app_amd = image(&fake, "acme/app", None, "amd64", &[layer(1), layer(10)]);
    let app_arm = image(&fake, "acme/app", None, "arm64", &[layer(2), layer(11)]);
    let good = index(
        &fake,
        "acme/app",
        "multi",
        &[("amd64", &app_amd), ("arm64", &app_arm)],
    );
    // amd64 layers listed as arm64.
    let swapped = index(
        &fake,
        "acme/app",
        "swapped",
        &[("amd64", &app_amd), ("arm64", &app_amd)],
    );
    // A single-platform image: its config says arm64, its layers are amd64's base.
    let (mislabelled, _) = image(
        &fake,
        "acme/app",
        Some("mislabelled"),
        "arm64",
        &[layer(1), layer(12)],
    );
    let (single, _) = image(
        &fake,
        "acme/app",
        Some("single"),
        "arm64",
        &[layer(2), layer(12)],
    );

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::with_config(dir.clone(), &config(dir.path(), &fake, "")).await;
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/multi")
            .await
            .unwrap(),
        good
    );
    assert_eq!(proxy.metric("pullgate_base_images "), 2.0);
    // Children by digest, as containerd asks for them after the index.
    for (d, _) in [&app_amd, &app_arm] {
        assert!(digest_of(&proxy, &format!("/v2/acme/app/manifests/{d}"))
            .await
            .is_ok());
    }
    let v = digest_of(&proxy, "/v2/acme/app/manifests/swapped")
        .await
        .unwrap_err();
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("platform linux/arm64"), "{swapped}: {msg}");
    let v = digest_of(&proxy, "/v2/acme/app/manifests/mislabelled")
        .await
        .unwrap_err();
    assert_eq!(
        v["errors"][0]["detail"]["reasons"][0], "base-not-allowed",
        "{mislabelled}: {v}"
    );
    assert_eq!(
        digest_of(&proxy, "/v2/acme/app/manifests/single")
            .await
            .unwrap(),
        single
    );
}

#[tokio::test]
async fn forged_and_skipped_content_is_never_approved() {
    let fake = Fake::start().await;
    image(
        &fake,
        "distroless/static",
        Some("nonroot"),
        "amd64",
        &[layer(1)],
    );
    let good = image(&fake, "acme/app", None, "amd64", &[layer(1), layer(10)]);
    let evil = image(&fake, "acme/app", None, "amd64", &[layer(66)]);

    // Both an index (with a child on the base) and an image (evil layers).
    let evil_layer = common::sha(&layer(66));
    let ambiguous = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": evil_layer, "size": 64},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": evil_layer, "size": 64}],
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": good.0, "size": good.1,
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }))
    .unwrap();
    fake.put_manifest("acme/app", Some("ambiguous"), OCI_MANIFEST, ambiguous);
    // An index whose second entry is labelled an attestation: left out of
    // the base check, so it must not pass with the index.
    let bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": good.0, "size": good.1,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": evil.0, "size": evil.1,
             "platform": {"os": "unknown", "architecture": "unknown"},
             "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        ],
    }))
    .unwrap();
    fake.put_manifest("acme/app", Some("attested"), OCI_INDEX, bytes);
    // A runnable image under a signature-shaped tag.
    let sig_tag = format!("sha256-{}.sig", &good.0[7..]);
    let (runnable, _) = image(&fake, "acme/app", Some(&sig_tag), "amd64", &[layer(66)]);

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::with_config(dir.clone(), &config(dir.path(), &fake, "")).await;
    let r = proxy.get("/v2/acme/app/manifests/ambiguous").await;
    assert_eq!(r.status(), 502, "an ambiguous manifest is refused");
    assert!(r.text().await.unwrap().contains("ambiguous"));

    assert!(digest_of(&proxy, "/v2/acme/app/manifests/attested")
        .await
        .is_ok());
    assert!(
        digest_of(&proxy, &format!("/v2/acme/app/manifests/{}", good.0))
            .await
            .is_ok()
    );
    let v = digest_of(&proxy, &format!("/v2/acme/app/manifests/{}", evil.0))
        .await
        .unwrap_err();
    assert_eq!(
        v["errors"][0]["detail"]["reasons"][0], "base-not-allowed",
        "{v}"
    );

    let v = digest_of(&proxy, &format!("/v2/acme/app/manifests/{sig_tag}"))
        .await
        .unwrap_err();
    assert_eq!(
        v["errors"][0]["detail"]["reasons"][0], "base-not-allowed",
        "{runnable}: {v}"
    );

    let r = proxy.get(&format!("/v2/acme/app/blobs/{evil_layer}")).await;
    assert_eq!(r.status(), 403, "no way to the evil layer");
}

#[tokio::test]
async fn an_unreadable_base_history_is_moved_aside_not_overwritten() {
    let fake = Fake::start().await;
    image(
        &fake,
        "distroless/static",
        Some("nonroot"),
        "amd64",
        &[layer(1)],
    );
    image(
        &fake,
        "acme/app",
        Some("v1"),
        "amd64",
        &[layer(1), layer(10)],
    );
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::create_dir_all(dir.path().join("data/bases")).unwrap();
    std::fs::write(dir.path().join("data/bases/history.json"), "{not json").unwrap();
    let proxy = Proxy::with_config(dir.clone(), &config(dir.path(), &fake, "")).await;
    assert!(digest_of(&proxy, "/v2/acme/app/manifests/v1").await.is_ok());
    let names: Vec<String> = std::fs::read_dir(dir.path().join("data/bases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let aside = names
        .iter()
        .find(|n| n.starts_with("history.unreadable-"))
        .unwrap_or_else(|| panic!("{names:?}"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("data/bases").join(aside)).unwrap(),
        "{not json"
    );
    let fresh = std::fs::read_to_string(dir.path().join("data/bases/history.json")).unwrap();
    assert!(fresh.contains("sha256:"), "{fresh}");
}

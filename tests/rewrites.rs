//! Name rewrites and tag pins against a fake upstream: what a pull resolves
//! to, and which upstream requests it costs.

mod common;

use std::sync::Arc;

use common::{error_code, noise, Fake, Proxy};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn config(dir: &std::path::Path, fake: &Fake, head: &str, rest: &str) -> String {
    format!(
        r#"{head}
[storage]
path = "{path}"
tag_ttl = "0s"

[audit]
path = "audit.jsonl"
approvals = true

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[[upstream]]
name = "registry.internal"
url = "{url}"

{rest}
"#,
        path = dir.join("data").display(),
        url = fake.url(),
    )
}

/// The audit lines written so far, once one of them is a `decision` line
/// (the writer flushes every 100 ms, so earlier lines can land first).
async fn audit_lines_with(dir: &std::path::Path, decision: &str) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["decision"] == decision) {
            return lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no {decision} line in the audit log after 2 s");
}

#[tokio::test]
async fn a_rewritten_name_serves_the_targets_content_under_the_targets_policy() {
    let fake = Fake::start().await;
    // The "internal" copy lives under mirror/ on the fake; the public name
    // exists upstream too, with other content, and must not be asked for.
    let (internal, layers) = fake.put_image("mirror/bitnami/redis", "7", &[noise(300, 1)]);
    let (public, _) = fake.put_image("bitnami/redis", "7", &[noise(300, 2)]);
    assert_ne!(internal, public);
    fake.put_image("mirror/bitnami/blocked", "1", &[noise(30, 3)]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let text = config(
        dir.path(),
        &fake,
        "",
        r#"
[[rewrite]]
from = "docker.io/bitnami/**"
to = "registry.internal/mirror/bitnami/**"

[[policy]]
name = "no blocked"
match = ["registry.internal/mirror/bitnami/blocked"]
deny = true

[[policy]]
name = "all"
match = ["**"]
"#,
    );
    let proxy = Proxy::with_config(dir.clone(), &text).await;

    // Every routing style of the public name gets the internal content.
    for path in [
        "/v2/bitnami/redis/manifests/7",
        "/v2/docker.io/bitnami/redis/manifests/7",
        "/v2/bitnami/redis/manifests/7?ns=docker.io",
    ] {
        let r = proxy.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["docker-content-digest"], internal.as_str());
    }
    let r = proxy
        .get(&format!("/v2/bitnami/redis/manifests/{internal}"))
        .await;
    assert_eq!(r.status(), 200);
    let r = proxy
        .get(&format!("/v2/bitnami/redis/blobs/{}", layers[0]))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), noise(300, 1));
    assert_eq!(
        fake.total_hits("/v2/bitnami/redis/"),
        0,
        "the public name is never asked for"
    );
    assert!(fake.total_hits("/v2/mirror/bitnami/redis/") > 0);

    // Policy is evaluated on the name served; the audit log shows both.
    let (status, code, v) = error_code(proxy.get("/v2/bitnami/blocked/manifests/1").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"), "{v}");
    assert_eq!(v["errors"][0]["detail"]["policy"], "no blocked");
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("registry.internal/mirror/bitnami/blocked, served for docker.io/bitnami/blocked by a rewrite"),
        "{msg}"
    );
    let lines = audit_lines_with(dir.path(), "deny").await;
    let denied = lines
        .iter()
        .find(|l| l["decision"] == "deny")
        .expect("a deny line");
    assert_eq!(denied["name"], "registry.internal/mirror/bitnami/blocked");
    assert_eq!(denied["rewritten_from"], "docker.io/bitnami/blocked");
    let allowed = lines
        .iter()
        .find(|l| l["decision"] == "allow")
        .expect("an allow line");
    assert_eq!(allowed["rewritten_from"], "docker.io/bitnami/redis");

    // A name no rule covers is untouched.
    let r = proxy.get("/v2/library/other/manifests/1").await;
    assert_eq!(r.status(), 404);
    assert_eq!(fake.hits("GET", "/v2/library/other/manifests/1"), 1);
}

#[tokio::test]
async fn a_pinned_tag_resolves_without_asking_the_upstream_and_still_meets_policy() {
    let fake = Fake::start().await;
    let (old, _) = fake.put_image("library/alpine", "3.20", &[noise(100, 10)]);
    let (new, _) = fake.put_image("library/alpine", "3.20", &[noise(100, 11)]);
    let (denied, _) = fake.put_image("library/evil", "1", &[noise(100, 12)]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(
        dir.path().join("pins.toml"),
        format!("[pins]\n\"docker.io/library/evil:1\" = \"{denied}\"\n"),
    )
    .unwrap();
    let text = config(
        dir.path(),
        &fake,
        "pins_file = \"pins.toml\"",
        &format!(
            r#"
[pins]
"alpine:3.20" = "{old}"

[[policy]]
name = "no evil"
match = ["docker.io/library/evil"]
deny = true

[[policy]]
name = "all"
match = ["**"]
"#
        ),
    );
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    for _ in 0..3 {
        let r = proxy.get("/v2/library/alpine/manifests/3.20").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], old.as_str());
    }
    assert_eq!(fake.hits("GET", "/v2/library/alpine/manifests/3.20"), 0);
    assert_eq!(fake.hits("HEAD", "/v2/library/alpine/manifests/3.20"), 0);
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/alpine/manifests/{old}")),
        1,
        "fetched once by digest, then from the store"
    );
    // Other tags of the repository resolve upstream as usual.
    fake.put_manifest(
        "library/alpine",
        Some("edge"),
        OCI_MANIFEST,
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": new, "size": 1}, "layers": []}))
        .unwrap(),
    );
    assert_eq!(
        proxy
            .get("/v2/library/alpine/manifests/edge")
            .await
            .status(),
        200
    );
    // A pin (from the pins file) does not bypass policy.
    let (status, _, v) = error_code(proxy.get("/v2/library/evil/manifests/1").await).await;
    assert_eq!(status, 403, "{v}");

    // SIGHUP: the pins file is read again.
    std::fs::write(
        dir.path().join("pins.toml"),
        format!("[pins]\n\"docker.io/library/alpine:3.20\" = \"{new}\"\n"),
    )
    .unwrap();
    let config = pullgate::Config::parse(
        &text.replace("\"alpine:3.20\" = ", "\"alpine:3.19\" = "),
        "t",
        dir.path(),
    )
    .unwrap();
    proxy.app.reload(config).unwrap();
    let r = proxy.get("/v2/library/alpine/manifests/3.20").await;
    assert_eq!(r.headers()["docker-content-digest"], new.as_str());
    assert_eq!(fake.hits("GET", "/v2/library/alpine/manifests/3.20"), 0);
}

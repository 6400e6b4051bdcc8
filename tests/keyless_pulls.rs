//! Keyless signatures on pulls: `[identities]` in `signed_by`, against a
//! fake upstream holding images signed by the tests' own sigstore
//! (tests/sigstore_pki): legacy `.sig` layers with certificate annotations,
//! and sigstore bundles attached as referrers.

mod common;
mod sigstore_pki;

use bytes::Bytes;
use common::{error_code, noise, Fake, Options, Proxy};
use pullgate::cosign;
use pullgate::names::Digest;
use sigstore_pki::Sigstore;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ISSUER: &str = "https://accounts.acme.example";

/// Signs `image` keyless as `identity` and publishes the `.sig` manifest
/// cosign's legacy format would.
fn sign_legacy(fake: &Fake, store: &Sigstore, repo: &str, image: &str, identity: &str) {
    let (manifest, payload, config) =
        store.legacy_signature(&format!("docker.io/{repo}"), image, identity, ISSUER);
    fake.put_blob(Bytes::from(payload));
    fake.put_blob(Bytes::from(config));
    let d: Digest = image.parse().unwrap();
    fake.put_manifest(
        repo,
        Some(&cosign::signature_tag(&d)),
        OCI_MANIFEST,
        manifest,
    );
}

/// Attaches a keyless sigstore bundle (v0.3, with an inclusion proof) over
/// the image manifest's bytes as a referrer.
async fn attach_keyless_bundle(
    fake: &Fake,
    store: &Sigstore,
    repo: &str,
    image: &str,
    identity: &str,
) {
    let d: Digest = image.parse().unwrap();
    let manifest_bytes = fake.state.manifests.lock().unwrap()[&(repo.to_owned(), image.to_owned())]
        .1
        .clone();
    assert_eq!(Digest::of(&manifest_bytes), d);
    let mut s = store.signing(identity, ISSUER);
    s.v03 = true;
    let bundle = store.bundle(&manifest_bytes, &s).into_bytes();
    fake.attach_bundle_referrer(repo, image, bundle, true);
}

#[tokio::test]
async fn keyless_identities_in_signed_by_allow_their_signers_only() {
    let fake = Fake::start().await;
    let store = Sigstore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trusted_root.json");
    std::fs::write(&root, store.trusted_root()).unwrap();

    let (release, layers) = fake.put_image("library/release", "v1", &[noise(100, 1)]);
    sign_legacy(
        &fake,
        &store,
        "library/release",
        &release,
        "release@acme.example",
    );
    let (ci, _) = fake.put_image("library/ci", "v1", &[noise(100, 2)]);
    sign_legacy(&fake, &store, "library/ci", &ci, "ci-42@acme.example");
    let (evil, _) = fake.put_image("library/evil", "v1", &[noise(100, 3)]);
    sign_legacy(
        &fake,
        &store,
        "library/evil",
        &evil,
        "ci-42@acme.example.evil",
    );
    let (bundled, _) = fake.put_image("library/bundled", "v1", &[noise(100, 4)]);
    attach_keyless_bundle(
        &fake,
        &store,
        "library/bundled",
        &bundled,
        "release@acme.example",
    )
    .await;
    let (stranger, _) = fake.put_image("library/stranger", "v1", &[noise(100, 5)]);
    attach_keyless_bundle(
        &fake,
        &store,
        "library/stranger",
        &stranger,
        "mallory@acme.example",
    )
    .await;
    fake.put_image("library/unsigned", "v1", &[noise(100, 6)]);

    let policies = format!(
        r#"[sigstore]
trusted_root = "{}"

[identities]
release = {{ issuer = "{ISSUER}", subject = "release@acme.example" }}
ci = {{ issuer = "{ISSUER}", subject_regex = 'ci-[0-9]+@acme\.example$' }}

[[policy]]
name = "signed library"
match = ["docker.io/library/**"]
signed_by = ["release", "ci"]
"#,
        root.display()
    );
    let proxy = Proxy::start(
        &fake,
        Options {
            policies,
            ..Options::default()
        },
    )
    .await;

    for ok in ["release", "ci", "bundled"] {
        let r = proxy.get(&format!("/v2/library/{ok}/manifests/v1")).await;
        assert_eq!(r.status(), 200, "{ok}: {:?}", r.text().await);
    }
    assert_eq!(
        proxy
            .get(&format!("/v2/library/release/blobs/{}", layers[0]))
            .await
            .status(),
        200
    );
    for (bad, reason) in [
        ("evil", "bad-signature"),
        ("stranger", "bad-signature"),
        ("unsigned", "unsigned"),
    ] {
        let (s, _, v) =
            error_code(proxy.get(&format!("/v2/library/{bad}/manifests/v1")).await).await;
        assert_eq!(s, 403, "{bad}: {v}");
        assert_eq!(v["errors"][0]["detail"]["reasons"][0], reason, "{bad}: {v}");
    }
}

#[test]
fn identities_are_checked_when_the_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\ndefault = true\n\n{text}")).unwrap();
        match pullgate::Config::load(&p) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let policy = "[[policy]]\nname = \"p\"\nmatch = [\"**\"]\nsigned_by = [\"d\"]\n";
    // The embedded production root, an exact subject: fine.
    let ok = check(&format!("[identities]\nd = {{ issuer = \"https://accounts.google.com\", subject = \"keyless@distroless.iam.gserviceaccount.com\" }}\n\n{policy}"));
    assert_eq!(ok, "");
    for (text, says) in [
        ("[identities]\nd = { issuer = \"https://accounts.google.com\" }\n", "needs subject"),
        ("[identities]\nd = { issuer = \"https://accounts.google.com\", subject = \"a\", subject_regex = \"b\" }\n", "not both"),
        ("[identities]\nd = { issuer = \"accounts.google.com\", subject = \"a\" }\n", "not an OIDC issuer URL"),
        ("[identities]\nd = { issuer = \"https://a\", subject_regex = \"(\" }\n", "not a regex"),
        ("[identities]\nd = { issuer = \"https://a\", subject = \"a\", audience = \"x\" }\n", "unknown key \"audience\""),
        ("[sigstore]\ntrusted_root = \"/nonexistent/root.json\"\n\n[identities]\nd = { issuer = \"https://a\", subject = \"a\" }\n", "sigstore.trusted_root"),
        ("[sigstore]\nroot = \"x\"\n\n[identities]\nd = { issuer = \"https://a\", subject = \"a\" }\n", "unknown key \"root\""),
    ] {
        let e = check(&format!("{text}\n{policy}"));
        assert!(e.contains(says), "{text}: {e}");
    }
    // A name that is a key and an identity at once.
    let key = dir.path().join("d.pub");
    std::fs::write(
        &key,
        pullgate::keys::PrivateKey::generate("ecdsa-p256")
            .unwrap()
            .public_pem(),
    )
    .unwrap();
    let e = check(&format!("[keys]\nd = \"{}\"\n\n[identities]\nd = {{ issuer = \"https://a\", subject = \"a\" }}\n\n{policy}", key.display()));
    assert!(e.contains("also a key"), "{e}");
    let e = check("[[policy]]\nname = \"p\"\nmatch = [\"**\"]\nsigned_by = [\"nobody\"]\n");
    assert!(e.contains("[identities]"), "{e}");
    // A bad identity is one problem, not also an undefined name.
    let e = check(&format!(
        "[identities]\nd = {{ issuer = 7, subject = \"a\" }}\n\n{policy}"
    ));
    assert!(e.contains("must be a string"), "{e}");
    assert!(!e.contains("not defined"), "{e}");
    // A trusted root given is read even before an identity uses it.
    let e = check("[sigstore]\ntrusted_root = \"/nonexistent/root.json\"\n\n[[policy]]\nname = \"p\"\nmatch = [\"**\"]\n");
    assert!(e.contains("sigstore.trusted_root"), "{e}");
    // A regex that would allow everyone.
    let e = check(&format!(
        "[identities]\nd = {{ issuer = \"https://a\", subject_regex = 'x|' }}\n\n{policy}"
    ));
    assert!(e.contains("empty string"), "{e}");
}

#[tokio::test]
async fn each_broken_part_of_a_keyless_signature_denies_the_pull() {
    use std::time::Duration;
    let fake = Fake::start().await;
    let store = Sigstore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trusted_root.json");
    std::fs::write(&root, store.trusted_root()).unwrap();
    const ID: &str = "release@acme.example";
    // Each image gets a legacy keyless signature bent one way.
    type Bend = Box<dyn Fn(&mut sigstore_pki::Signing)>;
    let cases: Vec<(&str, Bend)> = vec![
        ("good", Box::new(|_| {})),
        (
            "wrong-issuer",
            Box::new(|s| s.issuer = "https://evil.example".into()),
        ),
        (
            "expired-when-logged",
            Box::new(|s| {
                s.not_before -= Duration::from_secs(3600);
                s.not_after = s.not_before + Duration::from_secs(600);
            }),
        ),
        ("no-set", Box::new(|s| s.no_set = true)),
        ("forged-set", Box::new(|s| s.forge_set = true)),
        (
            "untrusted-ca",
            Box::new(|s| s.other_ca = Some(sigstore_pki::other_ca())),
        ),
        ("other-digest", Box::new(|_| {})),
    ];
    let mut n = 10;
    for (name, bend) in &cases {
        n += 1;
        let repo = format!("library/{name}");
        let (image, _) = fake.put_image(&repo, "v1", &[noise(100, n)]);
        let mut s = store.signing(ID, ISSUER);
        bend(&mut s);
        // The payload names another digest than the one it is stored for.
        let named = if *name == "other-digest" {
            Digest::of(b"another image").to_string()
        } else {
            image.clone()
        };
        let (manifest, payload, config) =
            store.legacy_signature_with(&format!("docker.io/{repo}"), &named, &s);
        fake.put_blob(Bytes::from(payload));
        fake.put_blob(Bytes::from(config));
        let d: Digest = image.parse().unwrap();
        fake.put_manifest(
            &repo,
            Some(&cosign::signature_tag(&d)),
            OCI_MANIFEST,
            manifest,
        );
    }
    let policies = format!(
        "[sigstore]\ntrusted_root = \"{}\"\n\n[identities]\nrelease = {{ issuer = \"{ISSUER}\", subject = \"{ID}\" }}\n\n[[policy]]\nname = \"p\"\nmatch = [\"docker.io/library/**\"]\nsigned_by = [\"release\"]\n",
        root.display()
    );
    let proxy = Proxy::start(
        &fake,
        Options {
            policies: policies.clone(),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        proxy.get("/v2/library/good/manifests/v1").await.status(),
        200
    );

    // pullgate verify names the identity that matched, or why not.
    let config = dir.path().join("pullgate.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"data\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n\n{policies}",
            fake.url()
        ),
    )
    .unwrap();
    let verify = |image: &str| {
        let (config, image) = (config.clone(), image.to_string());
        tokio::task::spawn_blocking(move || {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
                .args(["verify", &image, "--config"])
                .arg(&config)
                .output()
                .unwrap();
            (
                o.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            )
        })
    };
    let (code, out) = verify("docker.io/library/good:v1").await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("keyless signature verified: identity \"release\""),
        "{out}"
    );
    let (code, out) = verify("docker.io/library/wrong-issuer:v1").await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("signed by release@acme.example (issuer https://evil.example), an identity no signed_by name allows"),
        "{out}"
    );
    for (name, _) in &cases[1..] {
        let (s, _, v) =
            error_code(proxy.get(&format!("/v2/library/{name}/manifests/v1")).await).await;
        assert_eq!(s, 403, "{name}: {v}");
        assert_eq!(
            v["errors"][0]["detail"]["reasons"][0], "bad-signature",
            "{name}: {v}"
        );
    }
}

//! Keyless sigstore bundles made under the tests' own CA, CT log and
//! transparency log (tests/sigstore_pki), verified by `pullgate
//! verify-bundle` against their trusted_root.json: the good one passes,
//! and each broken part fails with its reason.

mod sigstore_pki;

use std::process::Command;
use std::time::Duration;

use sigstore_pki::{legacy_annotations, other_ca, other_key, Signing, Sigstore};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");
const ID: &str = "release@acme.example";
const ISSUER: &str = "https://accounts.acme.example";

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new(store: &Sigstore) -> Case {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("trusted_root.json"), store.trusted_root()).unwrap();
        std::fs::write(dir.path().join("artifact"), b"the signed bytes\n").unwrap();
        Case { dir }
    }

    /// Runs verify-bundle on `bundle` for the artifact (or `other`) with
    /// this identity: (exit code, stderr).
    fn verify(&self, bundle: &str, identity: &str, issuer: &str, other: bool) -> (i32, String) {
        let d = self.dir.path();
        if other {
            std::fs::write(d.join("other"), b"other bytes\n").unwrap();
        }
        let artifact = d.join(if other { "other" } else { "artifact" });
        self.verify_arg(bundle, identity, issuer, artifact.to_str().unwrap())
    }

    /// The same with FILE_OR_DIGEST as given.
    fn verify_arg(&self, bundle: &str, identity: &str, issuer: &str, arg: &str) -> (i32, String) {
        let d = self.dir.path();
        std::fs::write(d.join("bundle.json"), bundle).unwrap();
        let o = Command::new(BIN)
            .arg("verify-bundle")
            .arg("--bundle")
            .arg(d.join("bundle.json"))
            .args([
                "--certificate-identity",
                identity,
                "--certificate-oidc-issuer",
                issuer,
            ])
            .arg("--trusted-root")
            .arg(d.join("trusted_root.json"))
            .arg(arg)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }
}

const ART: &[u8] = b"the signed bytes\n";

#[test]
fn a_keyless_bundle_from_a_trusted_ca_and_log_verifies_for_its_identity_only() {
    let store = Sigstore::new();
    let case = Case::new(&store);
    let good = store.bundle(ART, &store.signing(ID, ISSUER));
    let (code, out) = case.verify(&good, ID, ISSUER, false);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("identity {ID}, issuer {ISSUER}")),
        "{out}"
    );

    // The same bundle, asked for someone else.
    let (code, out) = case.verify(&good, "mallory@acme.example", ISSUER, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("identity mismatch"), "{out}");
    let (code, out) = case.verify(&good, ID, "https://evil.example", false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("issuer mismatch"), "{out}");
    // By digest (the protocol's sha256:<hex>), the same verdict.
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ART))
    );
    let (code, out) = case.verify_arg(&good, ID, ISSUER, &digest);
    assert_eq!(code, 0, "{out}");
    // For other bytes than it signed.
    let (code, out) = case.verify(&good, ID, ISSUER, true);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("artifact mismatch"), "{out}");
}

#[test]
fn each_broken_part_of_a_keyless_bundle_fails_with_its_reason() {
    let store = Sigstore::new();
    let case = Case::new(&store);
    let bent = |f: &dyn Fn(&mut Signing)| {
        let mut s = store.signing(ID, ISSUER);
        f(&mut s);
        store.bundle(ART, &s)
    };
    // A Fulcio certificate lives minutes: it is judged at the logged time.
    let long_ago = bent(&|s| {
        s.not_before -= Duration::from_secs(7200);
        s.not_after = s.not_before + Duration::from_secs(600);
        s.integrated_time = s.not_before + Duration::from_secs(300);
    });
    let (code, out) = case.verify(&long_ago, ID, ISSUER, false);
    assert_eq!(code, 0, "expired now but valid when logged: {out}");
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "a certificate valid now but not yet when the entry was logged",
            bent(&|s| s.integrated_time = s.not_before - Duration::from_secs(60)),
            &["CertNotValidYet"],
        ),
        (
            "a certificate that had expired when the entry was logged",
            bent(&|s| {
                s.not_before -= Duration::from_secs(3600);
                s.not_after = s.not_before + Duration::from_secs(600);
            }),
            &["CertExpired"],
        ),
        (
            "a forged signed entry timestamp",
            bent(&|s| s.forge_set = true),
            &["SET verification failed"],
        ),
        (
            "no signed entry timestamp",
            bent(&|s| s.no_set = true),
            &["must have an inclusion promise"],
        ),
        (
            "a CA the trusted root does not hold",
            bent(&|s| s.other_ca = Some(other_ca())),
            &["UnknownIssuer"],
        ),
        (
            "an SCT signed by a key that is not the CT log's",
            bent(&|s| s.sct_key = Some(other_key())),
            &["SCT signature verification failed"],
        ),
    ];
    for (what, bundle, reasons) in cases {
        let (code, out) = case.verify(&bundle, ID, ISSUER, false);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(
            reasons.iter().any(|r| out.contains(r)),
            "{what}: the reason should say {reasons:?}: {out}"
        );
    }
}

#[test]
fn a_legacy_keyless_sig_layer_verifies_as_the_bundle_it_amounts_to() {
    use pullgate::keyless::{bundle_from_legacy, Expect, Keyless, LegacySignature, Root, Signed};
    let store = Sigstore::new();
    let case = Case::new(&store);
    let root = case.dir.path().join("trusted_root.json");
    let keyless = Keyless::new(Root::File(&root)).unwrap();
    let expect = Expect::Identity {
        identity: ID.into(),
        issuer: ISSUER.into(),
    };
    let bundle = store.bundle(ART, &store.signing(ID, ISSUER));
    let (sig, cert, rekor) = legacy_annotations(&bundle);
    let legacy = LegacySignature {
        payload: ART,
        signature: &sig,
        certificate: &cert,
        chain: Some(&cert_of(&store.ca_der)),
        rekor_bundle: &rekor,
    };
    let adapted = bundle_from_legacy(&legacy).unwrap();
    let v = keyless
        .verify(&adapted, Signed::Bytes(ART), &expect)
        .unwrap();
    assert_eq!(v.identity.as_deref(), Some(ID));

    // The same annotations on other bytes: the log entry does not match.
    let other = LegacySignature {
        payload: b"another payload",
        ..legacy
    };
    let e = keyless
        .verify(
            &bundle_from_legacy(&other).unwrap(),
            Signed::Bytes(b"another payload"),
            &expect,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid signature"), "{e}");
    // The signed entry timestamp of another signing.
    let (_, _, rekor2) = legacy_annotations(&store.bundle(ART, &store.signing(ID, ISSUER)));
    let swapped = LegacySignature {
        rekor_bundle: &rekor2,
        ..legacy
    };
    let e = keyless
        .verify(
            &bundle_from_legacy(&swapped).unwrap(),
            Signed::Bytes(ART),
            &expect,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not match") || e.contains("mismatch"),
        "{e}"
    );
    // Annotations that are not what cosign writes.
    let broken = LegacySignature {
        rekor_bundle: "{\"SignedEntryTimestamp\": 1}",
        ..legacy
    };
    assert!(bundle_from_legacy(&broken).is_err());
    let no_cert = LegacySignature {
        certificate: "",
        chain: None,
        ..legacy
    };
    assert!(bundle_from_legacy(&no_cert).is_err());
}

fn cert_of(der: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    )
}

#[test]
fn a_v03_bundle_with_an_inclusion_proof_and_checkpoint_verifies_and_each_bad_proof_fails() {
    let store = Sigstore::new();
    let case = Case::new(&store);
    let v03 = |f: &dyn Fn(&mut Signing)| {
        let mut s = store.signing(ID, ISSUER);
        s.v03 = true;
        f(&mut s);
        store.bundle(ART, &s)
    };
    let (code, out) = case.verify(&v03(&|_| {}), ID, ISSUER, false);
    assert_eq!(code, 0, "{out}");
    for (what, bundle, reason) in [
        (
            "a root hash that is not the tree's",
            v03(&|s| s.corrupt_root = true),
            "inclusion proof",
        ),
        (
            "a checkpoint signed by another key",
            v03(&|s| s.checkpoint_key = Some(other_key())),
            "No valid Rekor signature found on checkpoint",
        ),
        (
            "no inclusion proof",
            v03(&|s| s.no_proof = true),
            "must have an inclusion proof",
        ),
    ] {
        let (code, out) = case.verify(&bundle, ID, ISSUER, false);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(
            out.contains(reason),
            "{what}: the reason should say {reason:?}: {out}"
        );
    }
}

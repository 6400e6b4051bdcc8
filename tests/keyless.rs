//! Keyless sigstore bundles made under the tests' own CA, CT log and
//! transparency log (tests/sigstore_pki), verified by `pullgate
//! verify-bundle` against their trusted_root.json: the good one passes,
//! and each broken part fails with its reason.

mod sigstore_pki;

use std::process::Command;
use std::time::Duration;

use sigstore_pki::{other_ca, other_key, Signing, Sigstore};

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
        std::fs::write(d.join("bundle.json"), bundle).unwrap();
        if other {
            std::fs::write(d.join("other"), b"other bytes\n").unwrap();
        }
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
            .arg(d.join(if other { "other" } else { "artifact" }))
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
    let cases: Vec<(&str, String, &[&str])> = vec![
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

//! `pullgate verify-bundle`: one sigstore bundle, verified offline, with the
//! arguments of the sigstore-conformance CLI protocol (docs/keyless.md).

use std::path::Path;
use std::process::ExitCode;

use pullgate::keyless::{Expect, Keyless, Root, Signed};

use super::EXIT_CONFIG;

pub struct Args<'a> {
    pub staging: bool,
    pub bundle: &'a Path,
    pub identity: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub key: Option<&'a Path>,
    pub trusted_root: Option<&'a Path>,
    pub artifact: &'a str,
}

/// `sha256:<64 hex>` that names no file is a digest; anything else a file
/// (the protocol's rule).
fn digest_arg(arg: &str) -> Option<[u8; 32]> {
    let hex = arg.strip_prefix("sha256:")?;
    if hex.len() != 64 || Path::new(arg).exists() {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}

pub fn verify_bundle(a: &Args) -> ExitCode {
    let fail = |code: u8, msg: String| {
        eprintln!("pullgate: {msg}");
        ExitCode::from(code)
    };
    let expect = match (a.identity, a.issuer, a.key) {
        (Some(identity), Some(issuer), None) => Expect::Identity {
            identity: identity.to_string(),
            issuer: issuer.to_string(),
        },
        (None, None, Some(key)) => match std::fs::read_to_string(key) {
            Ok(pem) => match Expect::key(&pem) {
                Ok(e) => e,
                Err(e) => return fail(EXIT_CONFIG, format!("{}: {e}", key.display())),
            },
            Err(e) => return fail(EXIT_CONFIG, format!("cannot read {}: {e}", key.display())),
        },
        _ => {
            return fail(
                EXIT_CONFIG,
                "give --certificate-identity with --certificate-oidc-issuer, or --key".into(),
            )
        }
    };
    let root = match (a.trusted_root, a.staging) {
        (Some(p), _) => Root::File(p),
        (None, true) => Root::Staging,
        (None, false) => Root::Production,
    };
    let keyless = match Keyless::new(root) {
        Ok(k) => k,
        Err(e) => return fail(EXIT_CONFIG, e.to_string()),
    };
    let bundle = match std::fs::read_to_string(a.bundle) {
        Ok(b) => b,
        Err(e) => return fail(1, format!("cannot read {}: {e}", a.bundle.display())),
    };
    let bytes;
    let signed = match digest_arg(a.artifact) {
        Some(d) => Signed::Sha256(d),
        None => match std::fs::read(a.artifact) {
            Ok(b) => {
                bytes = b;
                Signed::Bytes(&bytes)
            }
            Err(e) => return fail(1, format!("cannot read {}: {e}", a.artifact)),
        },
    };
    match keyless.verify(&bundle, signed, &expect) {
        Ok(v) => {
            let mut line = format!("{}: verified", a.bundle.display());
            if let (Some(id), Some(iss)) = (&v.identity, &v.issuer) {
                line.push_str(&format!(" (identity {id}, issuer {iss})"));
            }
            if let Some(t) = v.integrated_time {
                line.push_str(&format!(", logged at {t}"));
            }
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("{}: not verified: {e}", a.bundle.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_a_digest_only_when_it_names_no_file() {
        let hex = "ab".repeat(32);
        assert_eq!(digest_arg(&format!("sha256:{hex}")), Some([0xab; 32]));
        assert_eq!(digest_arg("sha256:abc"), None);
        assert_eq!(digest_arg(&format!("sha512:{hex}")), None);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(format!("sha256:{hex}"));
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(digest_arg(path.to_str().unwrap()), None);
    }
}

//! `pullgate keygen` and `pullgate approve`: keys of pullgate's own, and
//! approvals signed with them.

use std::path::{Path, PathBuf};

use super::{runtime, EXIT_CONFIG};
use crate::Scheme;
use pullgate::Config;

pub fn keygen(scheme: Scheme, out: &Path) -> Result<String, (u8, String)> {
    use std::io::Write;
    let name = match scheme {
        Scheme::Ed25519 => "ed25519",
        Scheme::EcdsaP256 => "ecdsa-p256",
    };
    let key = pullgate::keys::PrivateKey::generate(name).map_err(|e| (1, e))?;
    let with = |ext: &str| {
        let mut p = out.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let (private, public) = (with(".key"), with(".pub"));
    for p in [&private, &public] {
        if p.exists() {
            return Err((1, format!("{} exists; not overwriting it", p.display())));
        }
    }
    let write = |path: &std::path::Path, text: &str, mode: u32| -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write(&private, &key.to_pem(), 0o600)
        .map_err(|e| (1, format!("cannot write {}: {e}", private.display())))?;
    write(&public, &key.public_pem(), 0o644)
        .map_err(|e| (1, format!("cannot write {}: {e}", public.display())))?;
    Ok(format!(
        "wrote {} ({name} private key) and {} (public key for [keys])",
        private.display(),
        public.display()
    ))
}

pub fn approve(image: &str, key: &Path, config_path: &Path) -> Result<String, (u8, String)> {
    let config = Config::load(config_path).map_err(|e| (EXIT_CONFIG, e.to_string()))?;
    let (name, digest) = image.rsplit_once('@').ok_or_else(|| {
        (
            1,
            format!(
                "{image:?} is not NAME@DIGEST: an approval is of one digest; `pullgate verify {image} -c {}` prints the digest a pull gets (the line `manifest: sha256:...`)",
                config_path.display()
            ),
        )
    })?;
    let digest: pullgate::names::Digest = digest.parse().map_err(|e| (1, format!("{e}")))?;
    let name: pullgate::names::RepoName = name.parse().map_err(|e| (1, format!("{e}")))?;
    let router = pullgate::route::Router::for_upstreams(&config.upstreams);
    let route = router.route(&name, None).map_err(|e| (1, e.to_string()))?;
    let pem = std::fs::read_to_string(key)
        .map_err(|e| (1, format!("cannot read {}: {e}", key.display())))?;
    let private = pullgate::keys::PrivateKey::from_pem(&pem)
        .map_err(|e| (1, format!("{}: {e}", key.display())))?;
    // Beside a running server: the store is attached, not opened (no
    // lock), and the approval is written atomically.
    let store = pullgate::store::attach(&config.storage).map_err(|e| (1, e.to_string()))?;
    let rt = runtime(tokio::runtime::Builder::new_current_thread())
        .ok_or((1, "cannot start the runtime".to_owned()))?;
    let path = rt
        .block_on(pullgate::approvals::record(
            &*store,
            &route.canonical,
            &digest,
            &private,
        ))
        .map_err(|e| {
            (
                1,
                format!("cannot store the approval in {}: {e}", store.location()),
            )
        })?;
    let public = pullgate::keys::PublicKey::from_pem(&private.public_pem()).map_err(|e| (1, e))?;
    let policy = config
        .policies
        .iter()
        .find(|p| p.matcher.is_match(&route.canonical));
    let trusted_as: Vec<&str> = policy
        .into_iter()
        .flat_map(|p| p.signed_by.iter())
        .filter(|k| k.key.same_key(&public))
        .map(|k| k.name.as_str())
        .collect();
    let note = if let Some(p) = policy.filter(|p| p.deny) {
        format!(
            "; note: the policy matching this name ({:?}) denies every name it matches (deny = true), so no approval lets it through",
            p.name
        )
    } else if policy.is_none() {
        "; note: no policy matches this name, and unmatched names are denied whatever is approved"
            .to_owned()
    } else if trusted_as.is_empty() {
        "; note: the policy matching this name does not trust this key, so pulls are not affected until it does".to_owned()
    } else {
        format!(
            " (trusted as {:?} by the matching policy)",
            trusted_as.join(", ")
        )
    };
    Ok(format!(
        "approved {}@{digest}: {path}{note}",
        route.canonical
    ))
}

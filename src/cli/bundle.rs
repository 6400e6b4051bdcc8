//! `pullgate export` and `pullgate import`: approved images across an air
//! gap.

use std::path::Path;
use std::process::ExitCode;

use super::{load_config, runtime};
use pullgate::bundle::export::{self, ExportError};
use pullgate::bundle::import::{self, AppliedBy, ImportError};

/// The references of the command line and of `--from` (one per line; `#`
/// starts a comment).
fn references(refs: &[String], from: Option<&Path>) -> Result<Vec<String>, String> {
    let mut out = refs.to_vec();
    if let Some(f) = from {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                out.push(line.to_owned());
            }
        }
    }
    if out.is_empty() {
        return Err(
            "no references to export: give NAME[:TAG] or NAME@DIGEST arguments, or --from FILE"
                .into(),
        );
    }
    Ok(out)
}

pub fn export(
    config: &Path,
    out: &Path,
    key: Option<&Path>,
    refs: &[String],
    from: Option<&Path>,
) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let refs = match references(refs, from) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(64);
        }
    };
    let key = match key.map(|k| {
        std::fs::read_to_string(k)
            .map_err(|e| format!("cannot read {}: {e}", k.display()))
            .and_then(|pem| {
                pullgate::keys::PrivateKey::from_pem(&pem)
                    .map_err(|e| format!("{}: {e}", k.display()))
            })
    }) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(64);
        }
    };
    let Some(rt) = runtime(multi_thread()) else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(export::export(config, &refs, out, key.as_ref())) {
        Ok(e) => {
            println!(
                "exported {} image{} ({} signature artifact{}, {} blobs, {}) to {}{}",
                e.images,
                if e.images == 1 { "" } else { "s" },
                e.artifacts,
                if e.artifacts == 1 { "" } else { "s" },
                e.blobs,
                bytesize::ByteSize(e.bytes),
                out.display(),
                if e.signed {
                    ", signed"
                } else {
                    ", unsigned (no --key)"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e @ ExportError::Denied(_)) => {
            eprintln!("pullgate: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("pullgate: export failed, nothing written: {e}");
            ExitCode::from(69)
        }
    }
}

pub fn import(config: &Path, bundle: &Path, allow_rollback: bool) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(rt) = runtime(multi_thread()) else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(import::import(config, bundle, allow_rollback)) {
        Ok(i) => {
            let signed = match &i.signed_by {
                Some(k) => format!("signed by {k:?}"),
                None => "unsigned".to_owned(),
            };
            println!(
                "imported {} image{} ({} blobs, {}) from {} ({signed}):",
                i.images.len(),
                if i.images.len() == 1 { "" } else { "s" },
                i.blobs,
                bytesize::ByteSize(i.bytes),
                bundle.display()
            );
            for image in &i.images {
                println!("  {image}");
            }
            match i.applied_by {
                AppliedBy::Server => println!("the server running on this store serves them now"),
                AppliedBy::Import => {
                    println!("no server is running on this store; it serves them when it starts")
                }
                AppliedBy::Pending => {
                    println!("committed; the server running on this store has not applied it yet, and will (or its next start will)");
                    return ExitCode::from(75);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e @ (ImportError::Bad(_) | ImportError::Refused(_))) => {
            eprintln!("pullgate: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("pullgate: import failed, nothing imported: {e}");
            ExitCode::from(74)
        }
    }
}

fn multi_thread() -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2);
    b
}

//! `pullgate verify` and `pullgate pin`: the pipeline's own verdict on an
//! image, printed step by step; `pin` writes an approved digest into the
//! pins file.

use std::path::Path;
use std::process::ExitCode;

use super::{load_config, runtime, EXIT_CONFIG};
use pullgate::pipeline::explain::{Explained, Outcome, Pins};
use pullgate::{App, Config};

/// Evaluates `image` step by step (`pullgate verify` and `pin`), printing
/// each step; no verdict is exit 69.
fn explain_printed(config: &Config, image: &str, pins: Pins) -> Result<Explained, ExitCode> {
    let runtime =
        runtime(tokio::runtime::Builder::new_current_thread()).ok_or(ExitCode::FAILURE)?;
    let result = runtime.block_on(async {
        let app =
            App::for_command(config.clone(), pins).map_err(|e| (e.to_string(), Vec::new()))?;
        app.explain(image).await
    });
    match result {
        Ok(e) => {
            for l in &e.lines {
                println!("{l}");
            }
            Ok(e)
        }
        Err((why, lines)) => {
            for l in &lines {
                println!("{l}");
            }
            eprintln!("pullgate: cannot reach a verdict: {why}");
            Err(ExitCode::from(69))
        }
    }
}

pub fn verify(image: &str, config: &Path) -> ExitCode {
    let explained =
        load_config(config).and_then(|config| explain_printed(&config, image, Pins::Honour));
    match explained {
        Ok(e) if e.outcome == Outcome::Allowed => ExitCode::SUCCESS,
        Ok(e) => {
            for hint in hints(&e, config) {
                println!("to let it through: {hint}");
            }
            ExitCode::from(1)
        }
        Err(code) => code,
    }
}

pub fn pin(image: &str, config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(pins_file) = config.pins_file.clone() else {
        eprintln!(
            "pullgate: {} has no pins_file; add one at the top of the file, e.g. pins_file = \"pins.toml\"",
            config_path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    if !image.rsplit('/').next().unwrap_or(image).contains(':') || image.contains('@') {
        eprintln!(
            "pullgate: pin takes NAME:TAG (e.g. docker.io/library/alpine:3.20), got {image:?}"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let e = match explain_printed(&config, image, Pins::Ignore) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let (Outcome::Allowed, Some(digest)) = (e.outcome, e.digest) else {
        eprintln!("pullgate: {image} is not allowed by policy; nothing pinned");
        return ExitCode::from(1);
    };
    // The pin is keyed by the name asked for, which is what pulls look up.
    let key = format!("{}:{}", e.asked, e.reference);
    let mut pins = match read_pins(&pins_file) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("pullgate: {msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Entries written another way (`alpine:3.20`) for the same tag are
    // replaced, not doubled.
    let hosts = pullgate::config::hosts(&config.upstreams);
    let same: Vec<String> = pins
        .keys()
        .filter(|k| {
            pullgate::config::image_ref(k, &hosts)
                .is_ok_and(|r| format!("{}:{}", r.canonical, r.reference) == key)
        })
        .cloned()
        .collect();
    let mut old = None;
    for k in same {
        old = pins.remove(&k);
    }
    // A pin in the config's own [pins] is not ours to change.
    let tag = e.reference.to_string();
    if let (None, Some(inline)) = (&old, config.pins.get(&e.asked, &tag)) {
        if inline == digest {
            println!(
                "{key} is already pinned to {digest} in [pins] of {}",
                config_path.display()
            );
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "pullgate: {key} is pinned to {inline} in [pins] of {}; change it there",
            config_path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    pins.insert(key.clone(), digest.to_string());
    if let Err(err) = pullgate::config::write_pins_file(&pins_file, &pins) {
        eprintln!(
            "pullgate: cannot write {}: {err}; the old file is unchanged",
            pins_file.display()
        );
        return ExitCode::from(73);
    }
    match old {
        Some(o) if o == digest.to_string() => println!("{key} was already pinned to {digest}"),
        Some(o) => println!(
            "pinned {key} to {digest} (was {o}) in {}",
            pins_file.display()
        ),
        None => println!("pinned {key} to {digest} in {}", pins_file.display()),
    }
    println!("a running pullgate applies it after SIGHUP (systemctl reload pullgate)");
    ExitCode::SUCCESS
}

/// What would make a denied image pass, one line per reason.
fn hints(e: &Explained, config: &Path) -> Vec<String> {
    use pullgate::policy::Reason;
    let at = match e.digest {
        Some(d) => format!("{}@{d}", e.served),
        None => format!("{}@sha256:...", e.served),
    };
    let cfg = config.display();
    let mut out = Vec::new();
    for r in &e.reasons {
        let hint = match r {
            Reason::Unsigned | Reason::BadSignature => format!(
                "sign it with a key the policy's signed_by names (cosign sign --key ... {at}), or approve it locally: pullgate approve {at} --key KEY -c {cfg} (KEY's public key in [keys] and in the policy's signed_by)"
            ),
            Reason::BaseNotAllowed => {
                "build it on an allowed base, or add its base image to the policy's [bases] set".to_owned()
            }
            Reason::TagNotAllowed => format!("pull it by digest: {at}"),
            Reason::NoPolicy => format!(
                "add a [[policy]] whose match covers {} (names that no policy matches are denied)",
                e.served
            ),
            Reason::DeniedByPolicy => {
                "the policy denies every name it matches (deny = true): narrow its match, or put a policy for this name before it".to_owned()
            }
            Reason::NotApproved | Reason::VerificationUnavailable | Reason::NotInTenant => continue,
        };
        if !out.contains(&hint) {
            out.push(hint);
        }
    }
    out
}

/// The pins a pins file holds now, as written (an absent file has none).
fn read_pins(path: &Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let mut out = std::collections::BTreeMap::new();
    if let Some(pins) = table.get("pins").and_then(|p| p.as_table()) {
        for (k, v) in pins {
            if let Some(d) = v.as_str() {
                out.insert(k.clone(), d.to_owned());
            }
        }
    }
    Ok(out)
}

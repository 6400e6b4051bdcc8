//! The commands: each parses nothing (clap did), calls the library and
//! prints what a person needs to read. Exit statuses follow sysexits.h.

mod bundle;
mod explain;
mod fsck;
mod hosts;
mod keys;
mod serve;
mod verify_bundle;

pub use bundle::{export, import};
pub use explain::{pin, verify};
pub use fsck::fsck;
pub use hosts::{containerd_hosts, Hosts};
pub use keys::{approve, keygen};
pub use serve::serve;
pub use verify_bundle::{verify_bundle, Args as VerifyBundleArgs};

use std::process::ExitCode;

use pullgate::Config;

/// Exit status for a bad config (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

pub fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            let plural = |n: usize, one: &str, many: &str| {
                format!("{n} {}", if n == 1 { one } else { many })
            };
            let mut parts = vec![
                plural(c.upstreams.len(), "upstream", "upstreams"),
                plural(c.policies.len(), "policy", "policies"),
            ];
            for (n, one, many) in [
                (c.bases.len(), "base set", "base sets"),
                (c.rewrites.len(), "rewrite", "rewrites"),
                (c.pins.len(), "pin", "pins"),
            ] {
                if n > 0 {
                    parts.push(plural(n, one, many));
                }
            }
            println!("{}: ok ({})", file.display(), parts.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Prints a command's outcome; failures exit 1 (64 for config problems).
pub fn report(result: Result<String, (u8, String)>) -> ExitCode {
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("pullgate: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Loads a config for a command; a bad one is reported (exit 64).
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Builds a tokio runtime, reporting a failure on stderr.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            None
        }
    }
}

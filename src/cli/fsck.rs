//! `pullgate fsck`: checks a store and reports what it moved aside.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use pullgate::store::fsck::{self, Progress};

use super::load_config;

/// Exit status when the store cannot be read (EX_IOERR).
const EXIT_IO: u8 = 74;

pub fn fsck(config: &Path) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let root = &config.storage.path;
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |p: Progress| {
        if terminal {
            eprint!(
                "\rfsck: {} blobs, {} checked",
                p.blobs,
                bytesize::ByteSize(p.bytes).to_string_as(true)
            );
        }
    };
    let report = match fsck::fsck(root, &mut progress) {
        Ok(r) => r,
        Err(e) => {
            if terminal {
                eprintln!();
            }
            eprintln!(
                "pullgate: cannot check the store at {}: {e}",
                root.display()
            );
            return ExitCode::from(EXIT_IO);
        }
    };
    if terminal {
        eprint!("\r\x1b[K");
    }
    for f in &report.findings {
        println!("{}: {}; {}", f.path.display(), f.problem, f.action);
    }
    println!(
        "{}: {} blobs ({}), {} manifests, {} tags, {} approvals checked{}",
        root.display(),
        report.blobs,
        bytesize::ByteSize(report.bytes).to_string_as(true),
        report.manifests,
        report.tags,
        report.approvals,
        if report.live {
            " beside the running server"
        } else {
            ""
        }
    );
    if report.temp_removed > 0 {
        println!(
            "removed {} temp files left by a pullgate that is no longer running",
            report.temp_removed
        );
    }
    match &report.quarantine {
        None => {
            println!("no problems found");
            ExitCode::SUCCESS
        }
        Some(q) => {
            let n = report.findings.len();
            println!(
                "{n} {} found; what was wrong is in {} (a running server fetches what it misses again)",
                if n == 1 { "problem" } else { "problems" },
                q.display()
            );
            ExitCode::FAILURE
        }
    }
}

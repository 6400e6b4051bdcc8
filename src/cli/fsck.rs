//! `pullgate fsck`: checks a store and reports what it moved aside.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use pullgate::store::fsck::{self, Progress};

use super::{load_config, runtime};

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
    let mut clean = match &report.quarantine {
        None => true,
        Some(q) => {
            let n = report.findings.len();
            println!(
                "{n} {} found; what was wrong is in {} (a running server fetches what it misses again)",
                if n == 1 { "problem" } else { "problems" },
                q.display()
            );
            false
        }
    };
    if let Some(s3) = &config.storage.s3 {
        match bucket(s3, terminal) {
            Ok(ok) => clean &= ok,
            Err(code) => return code,
        }
    }
    if clean {
        println!("no problems found");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Checks the replicas' shared bucket too; whether it was clean.
fn bucket(s3: &pullgate::config::S3Config, terminal: bool) -> Result<bool, ExitCode> {
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return Err(ExitCode::FAILURE);
    };
    let mut progress = |p: Progress| {
        if terminal {
            eprint!(
                "\rfsck: bucket: {} blobs, {} checked",
                p.blobs,
                bytesize::ByteSize(p.bytes).to_string_as(true)
            );
        }
    };
    let result = rt.block_on(async {
        let bucket = pullgate::store::Bucket::s3(s3)?;
        bucket.check().await?;
        let report = pullgate::store::fsck_bucket(&bucket, &mut progress).await?;
        Ok::<_, std::io::Error>((bucket.describe().to_owned(), report))
    });
    if terminal {
        eprint!("\r\x1b[K");
    }
    let (at, report) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullgate: cannot check the shared bucket: {e}");
            return Err(ExitCode::from(EXIT_IO));
        }
    };
    for f in &report.findings {
        println!("{at}: {}: {}; {}", f.path.display(), f.problem, f.action);
    }
    println!(
        "{at}: {} blobs ({}), {} tags, {} approvals checked",
        report.blobs,
        bytesize::ByteSize(report.bytes).to_string_as(true),
        report.tags,
        report.approvals,
    );
    Ok(match &report.quarantine {
        None => true,
        Some(q) => {
            let n = report.findings.len();
            println!(
                "{n} {} found in the bucket; what was wrong is under {q}/ there (a replica fetches what it misses again)",
                if n == 1 { "problem" } else { "problems" },
            );
            false
        }
    })
}

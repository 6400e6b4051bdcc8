//! `pullgate containerd-hosts`: the `certs.d` files that make containerd
//! pull through pullgate, written and removed by the binary itself.
//!
//! Hand-written because it is pullgate's own contract with containerd (see
//! deploy/containerd/README.md): pullgate is the `server` of `_default`,
//! never a `[host]` mirror, and the `[host]` table is there but empty. The
//! Kubernetes DaemonSet runs this in a sidecar of the pullgate image, which
//! has no shell to copy files with, once pullgate's /readyz answers.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::runtime;

/// First line of every file this command writes; `--remove` removes only
/// files that start with it.
const MARK: &str = "# Written by `pullgate containerd-hosts`";

/// What to do in a hosts directory.
pub struct Hosts<'a> {
    pub dir: &'a Path,
    pub server: &'a str,
    pub direct: &'a [String],
    pub remove: bool,
    pub wait: bool,
    pub after_ready: Option<&'a str>,
}

pub fn containerd_hosts(h: &Hosts) -> ExitCode {
    if let Some(url) = h.after_ready {
        if let Err(msg) = wait_until_ready(url) {
            eprintln!("pullgate: {msg}");
            return ExitCode::from(64);
        }
    }
    let result = if h.remove {
        remove(h.dir)
    } else {
        write(h.dir, h.server, h.direct)
    };
    let code = match result {
        Ok(lines) => {
            for l in lines {
                if l.starts_with("warning:") {
                    eprintln!("pullgate: {l}");
                } else {
                    println!("{l}");
                }
            }
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("pullgate: {msg}");
            return ExitCode::from(code);
        }
    };
    if h.wait {
        wait_for_signal();
    }
    code
}

/// Blocks until SIGTERM or SIGINT, so that a DaemonSet's pod stays Ready
/// once its work is done.
fn wait_for_signal() {
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return;
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        println!("done; waiting for SIGTERM");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
}

/// Polls `url` until it answers 200, so that the files go down only once
/// pullgate serves: a pullgate that cannot start (a bad config, a port in
/// use) then leaves the node's pulls as they were instead of failing them.
fn wait_until_ready(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("--after-ready {url:?}: {e}"))?;
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return Err("cannot start the runtime".into());
    };
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let started = std::time::Instant::now();
        let mut said = std::time::Duration::ZERO;
        loop {
            let last = match client.get(parsed.clone()).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::OK => return Ok(()),
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => format!("{e}"),
            };
            let waited = started.elapsed();
            if waited >= said {
                println!(
                    "waiting for {url} to answer 200 before writing ({last}; {}s so far)",
                    waited.as_secs()
                );
                said = waited + std::time::Duration::from_secs(30);
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}

/// containerd's directory for a registry as image references name it
/// (`host`, `host:port`, `[v6]:port`): containerd looks first for
/// `hostDirectory(host)`, which turns the part after the last colon into
/// `_port_`, then for the name as it is, then `_default`.
fn host_dir(authority: &str) -> String {
    match authority.rfind(':') {
        Some(i) if i > 0 => format!("{}_{}_", &authority[..i], &authority[i + 1..]),
        _ => authority.to_string(),
    }
}

/// The registry host of a `--direct` URL, checked so that it names one
/// directory under `certs.d/` and nothing else.
fn direct_host(url: &str) -> Result<(String, String), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("--direct {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "--direct {url:?}: the scheme must be https (or http for a plain registry)"
        ));
    }
    if parsed.path() != "/" || parsed.query().is_some() || !parsed.username().is_empty() {
        return Err(format!(
            "--direct {url:?}: give only the registry's address, like https://ghcr.io"
        ));
    }
    if parsed.host_str().is_none() {
        return Err(format!("--direct {url:?}: no host"));
    }
    // The registry as image references name it, port and all: the URL
    // parser drops a default port (https://r:443 is r), but containerd
    // looks `r:443/app` up under r_443_/, never r/.
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .unwrap_or_default()
        .to_string();
    let server = format!("{}://{authority}", parsed.scheme());
    Ok((authority, server))
}

fn render(server: &str, note: &str) -> String {
    // A TOML basic string: the URL was parsed, so it holds no quote or
    // backslash, but let the TOML crate write it anyway.
    let quoted = toml::Value::String(server.to_string()).to_string();
    format!(
        "{MARK}; `pullgate containerd-hosts --remove` removes it.\n\
         # {note}\n\
         # pullgate is the `server`, not a [host] mirror: containerd tries the next host\n\
         # on any answer >= 400, so a mirror could never block a pull.\n\
         server = {quoted}\n\
         \n\
         # Empty on purpose: containerd 1.6 rejects a hosts.toml without a [host]\n\
         # table. Add no entries.\n\
         [host]\n"
    )
}

fn ours(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.starts_with(MARK))
}

/// Writes `_default/hosts.toml` (every registry through `server`) and one
/// file per `--direct` registry, each atomically (temp file, fsync,
/// rename): containerd re-reads them on every pull.
fn write(dir: &Path, server: &str, direct: &[String]) -> Result<Vec<String>, (u8, String)> {
    let parsed =
        reqwest::Url::parse(server).map_err(|e| (64, format!("--server {server:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err((
            64,
            format!("--server {server:?}: give pullgate's address, like http://127.0.0.1:5000"),
        ));
    }
    let server = parsed.as_str().trim_end_matches('/');
    let mut files: Vec<(String, String)> = vec![(
        "_default".to_string(),
        render(
            server,
            "Every registry without a directory of its own is pulled through pullgate.",
        ),
    )];
    let mut direct_hosts = Vec::new();
    for d in direct {
        let (host, url) = direct_host(d).map_err(|e| (64, e))?;
        files.push((
            host_dir(&host),
            render(
                &url,
                &format!(
                    "{host} is pulled directly, NOT through pullgate: it serves pullgate's own \
                     image, pinned by digest, so that the mirror can start without itself."
                ),
            ),
        ));
        direct_hosts.push(host);
    }
    let mut out = Vec::new();
    for (sub, text) in &files {
        let path = dir.join(sub).join("hosts.toml");
        if path.exists() && !ours(&path) {
            return Err((
                1,
                format!(
                    "{} exists and was not written by pullgate; move it away first (containerd would use it instead of pullgate's)",
                    path.display()
                ),
            ));
        }
        write_atomic(&path, text)
            .map_err(|e| (73, format!("cannot write {}: {e}", path.display())))?;
        out.push(format!("wrote {}", path.display()));
    }
    // containerd takes the first of a registry's directories that exists,
    // with or without a hosts.toml (one with only a ca.crt pulls straight
    // from the registry): any directory not written here bypasses _default.
    for d in foreign_dirs(dir) {
        out.push(format!(
            "warning: {} was not written by pullgate; containerd uses it instead of _default, so that registry's pulls bypass pullgate",
            d.display()
        ));
    }
    if !direct_hosts.is_empty() {
        out.push(format!(
            "pulls of {} go directly to the registry, not through pullgate",
            direct_hosts.join(", ")
        ));
    }
    Ok(out)
}

/// The directories under `dir` that hold no hosts.toml of pullgate's.
fn foreign_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !ours(&p.join("hosts.toml")))
        .collect();
    v.sort();
    v
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(".hosts.toml.pullgate-tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(parent)?.sync_all()
}

/// Removes every `hosts.toml` this command wrote (and its directory when
/// that is then empty); other files are left alone and listed.
fn remove(dir: &Path) -> Result<Vec<String>, (u8, String)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(vec![format!(
                "{} does not exist: nothing to remove",
                dir.display()
            )])
        }
        Err(e) => return Err((74, format!("cannot read {}: {e}", dir.display()))),
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    let mut out = Vec::new();
    for sub in paths {
        let file = sub.join("hosts.toml");
        if !file.exists() {
            continue;
        }
        if !ours(&file) {
            out.push(format!("left {} (not written by pullgate)", file.display()));
            continue;
        }
        std::fs::remove_file(&file)
            .map_err(|e| (73, format!("cannot remove {}: {e}", file.display())))?;
        // Only an empty directory goes: remove_dir refuses any other.
        let _ = std::fs::remove_dir(&sub);
        out.push(format!("removed {}", file.display()));
    }
    if !out.iter().any(|l| l.starts_with("removed")) {
        out.push(format!("no file written by pullgate in {}", dir.display()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_names_containerds_underscore_directory() {
        assert_eq!(host_dir("ghcr.io"), "ghcr.io");
        assert_eq!(host_dir("registry.corp:5443"), "registry.corp_5443_");
        assert_eq!(host_dir("[fd00::1]:5000"), "[fd00::1]_5000_");
    }

    #[test]
    fn direct_takes_only_a_registry_address() {
        assert_eq!(
            direct_host("https://ghcr.io").unwrap(),
            ("ghcr.io".into(), "https://ghcr.io".into())
        );
        assert_eq!(
            direct_host("http://127.0.0.1:5001/").unwrap(),
            ("127.0.0.1:5001".into(), "http://127.0.0.1:5001".into())
        );
        // A default port stays: `r:443/app` is looked up under r_443_/.
        assert_eq!(
            direct_host("https://r.example:443").unwrap(),
            ("r.example:443".into(), "https://r.example:443".into())
        );
        for bad in [
            "ghcr.io",
            "ftp://x",
            "https://ghcr.io/v2/",
            "https://u@ghcr.io",
        ] {
            assert!(direct_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn written_files_parse_and_only_they_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let foreign = d.path().join("quay.io/hosts.toml");
        std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
        std::fs::write(&foreign, "server = \"https://quay.io\"\n").unwrap();
        // A directory with certificates only also wins over _default.
        let certs_only = d.path().join("gcr.io");
        std::fs::create_dir_all(&certs_only).unwrap();
        std::fs::write(certs_only.join("ca.crt"), "").unwrap();
        let direct = vec!["https://registry.corp:5443".to_string()];
        let out = write(d.path(), "http://127.0.0.1:5000", &direct).unwrap();
        let warned: Vec<&String> = out.iter().filter(|l| l.starts_with("warning:")).collect();
        assert_eq!(warned.len(), 2, "{out:?}");
        assert!(
            warned[0].contains("gcr.io") && warned[1].contains("quay.io"),
            "{out:?}"
        );
        // Writing again replaces pullgate's own files.
        write(d.path(), "http://127.0.0.1:5000/", &direct).unwrap();
        let t: toml::Table = std::fs::read_to_string(d.path().join("_default/hosts.toml"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(t["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert!(t["host"].as_table().unwrap().is_empty());
        let t: toml::Table =
            std::fs::read_to_string(d.path().join("registry.corp_5443_/hosts.toml"))
                .unwrap()
                .parse()
                .unwrap();
        assert_eq!(t["server"].as_str(), Some("https://registry.corp:5443"));
        // A foreign _default is not overwritten.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("_default")).unwrap();
        std::fs::write(other.path().join("_default/hosts.toml"), "server = \"x\"\n").unwrap();
        assert_eq!(
            write(other.path(), "http://127.0.0.1:5000", &[])
                .unwrap_err()
                .0,
            1
        );

        let out = remove(d.path()).unwrap();
        assert!(!d.path().join("_default").exists(), "{out:?}");
        assert!(!d.path().join("registry.corp_5443_").exists(), "{out:?}");
        assert!(foreign.exists());
        assert!(out.iter().any(|l| l.starts_with("left")), "{out:?}");
    }
}

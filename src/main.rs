//! The `pullgate` command: parses the CLI and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use pullgate::{explain, App, Config, Shutdown};

/// Exit status for a bad config (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "pullgate",
    version,
    about = "A caching reverse proxy for OCI and Docker registries that serves only approved content",
    long_about = "pullgate sits between container clients (containerd, CRI-O, Docker, skopeo) and \
registries (Docker Hub, ghcr.io, quay.io, ...). It caches what it serves, fetches each blob \
upstream once however many clients ask, and applies a policy to every pull.\n\n\
Quick start: `pullgate serve` runs a plain caching mirror of the big public registries on \
127.0.0.1:5000. Point containerd at it with deploy/containerd/ (see README.md)."
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PULLGATE_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (registry API on [server] listen, /metrics /healthz /readyz on [admin] listen).
    ///
    /// Without --config, runs the embedded default: 127.0.0.1:5000, store in ./pullgate-data,
    /// upstreams docker.io, ghcr.io, quay.io, gcr.io and registry.k8s.io, everything allowed.
    /// SIGHUP reloads the config file (an invalid one is logged and the old one kept);
    /// SIGTERM stops accepting and lets transfers in flight finish (server.shutdown_timeout).
    /// Log verbosity comes from RUST_LOG (default "info"; e.g. RUST_LOG=pullgate=debug).
    Serve {
        /// Config file (TOML); see config/ for commented examples.
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and report every problem with its key and line.
    ///
    /// Exits 0 when the file is valid, 64 when it is not.
    CheckConfig {
        /// Config file (TOML).
        #[arg(value_name = "FILE", required_unless_present = "config")]
        file: Option<PathBuf>,
        /// The same, given as for `serve`.
        #[arg(short, long, value_name = "FILE", conflicts_with = "file")]
        config: Option<PathBuf>,
    },
    /// Generate a signing key pair: PREFIX.key (PKCS#8, unencrypted, mode 0600)
    /// and PREFIX.pub (PKIX PEM, as cosign writes public keys).
    ///
    /// Put PREFIX.pub in [keys] to trust what the key signs; use PREFIX.key with
    /// `pullgate approve`.
    Keygen {
        #[arg(long, value_enum, default_value_t = Scheme::EcdsaP256)]
        scheme: Scheme,
        /// Output prefix: writes PREFIX.key and PREFIX.pub (never overwrites).
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Approve one image digest locally, as a signature pullgate holds itself.
    ///
    /// Signs a cosign simple-signing payload for the digest with KEY and stores it
    /// in the store of --config. A running server honours it at the next pull, with
    /// no restart, when KEY's public key is in a matching policy's signed_by.
    Approve {
        /// The image by digest: NAME@sha256:<hex>, e.g. ghcr.io/acme/app@sha256:...
        #[arg(value_name = "IMAGE@DIGEST")]
        image: String,
        /// Private key (PKCS#8 PEM, e.g. from `pullgate keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Config file whose store receives the approval.
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Evaluate policy for an image without serving it, step by step.
    ///
    /// Fetches the manifest, its signatures and the base images from the
    /// upstreams (nothing is stored) and explains the verdict: rewrites and
    /// pins applied, the policy that matched, the signatures found (which
    /// verified, why others did not), and the base the image is built on or
    /// how close it came. Exit status: 0 allowed, 1 denied, 64 bad config,
    /// 69 upstream unreachable or image not found.
    Verify {
        /// NAME[:TAG] or NAME@DIGEST, e.g. ghcr.io/acme/app:1.2
        #[arg(value_name = "IMAGE")]
        image: String,
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Freeze a tag: resolve it upstream, check it against policy, and write
    /// the approved digest into the config's pins_file.
    ///
    /// The pins file is created when missing and replaced atomically (temp
    /// file and rename), so a failure leaves the old one intact. A running
    /// server picks the pin up on SIGHUP. A denied image is not pinned.
    /// Exit status: 0 pinned, 1 denied, 64 bad config or no pins_file,
    /// 69 upstream unreachable, 73 pins file not writable.
    Pin {
        /// NAME:TAG, e.g. docker.io/library/alpine:3.20
        #[arg(value_name = "IMAGE:TAG")]
        image: String,
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Copy, Clone, ValueEnum)]
enum Scheme {
    Ed25519,
    EcdsaP256,
}

#[derive(Copy, Clone, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, config } => {
            let file = file.or(config).expect("clap requires one of them");
            check_config(&file)
        }

        Command::Keygen { scheme, out } => report(keygen(scheme, &out)),
        Command::Verify { image, config } => verify(&image, &config),
        Command::Pin { image, config } => pin(&image, &config),
        Command::Approve { image, key, config } => report(approve(&image, &key, &config)),
        Command::Serve { config } => {
            let config = match &config {
                Some(path) => match Config::load(path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                None => Config::embedded(),
            };
            init_logging(cli.log_format);
            let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("pullgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let embedded = config.source.starts_with('(');
    let source_path = (!embedded).then(|| PathBuf::from(&config.source));
    let listen = config.server.listen;
    let admin_listen = config.admin.as_ref().map(|a| a.listen);
    let grace = config.server.shutdown_timeout;
    if embedded {
        tracing::warn!(
            "running the embedded default config: a plain caching mirror of docker.io, ghcr.io, \
             quay.io, gcr.io and registry.k8s.io; no verification is configured and every pull is \
             allowed. Example configs: config/ in the source tree (docs/configuration.md)"
        );
    }
    let upstream_names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    tracing::info!(
        source = %config.source,
        upstreams = ?upstream_names,
        policies = config.policies.len(),
        base_sets = config.bases.len(),
        rewrites = config.rewrites.len(),
        pins = config.pins.len(),
        "config loaded"
    );

    let app = App::new(config).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let admin = match admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin.listen)"))?,
        ),
        None => None,
    };

    let (trigger, shutdown) = Shutdown::new();
    let mut tasks = Vec::new();
    tracing::info!(listen = %listener.local_addr()?, "serving the registry API");
    tasks.push(tokio::spawn(pullgate::serve(
        listener,
        app.clone(),
        shutdown.clone(),
        grace,
    )));
    if let Some(admin) = admin {
        tracing::info!(listen = %admin.local_addr()?, "serving /metrics /healthz /readyz /dashboard /api/*");
        tasks.push(tokio::spawn(pullgate::serve_admin(
            admin,
            app.clone(),
            shutdown.clone(),
        )));
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&app, source_path.as_deref()),
        }
    }
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections, finishing requests in flight"
    );
    trigger.trigger();
    for t in tasks {
        let _ = t.await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn reload(app: &Arc<App>, path: Option<&std::path::Path>) {
    app.audit.reopen();
    let Some(path) = path else {
        tracing::info!("SIGHUP: running the embedded config, nothing to reload");
        return;
    };
    let result = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|c| app.reload(c));
    match result {
        Ok(notes) => {
            app.metrics.config_reloads.with_label_values(&["ok"]).inc();
            tracing::info!(path = %path.display(), "config reloaded");
            for n in notes {
                tracing::warn!("{n}");
            }
        }
        Err(e) => {
            app.metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            tracing::error!("config reload failed, keeping the old config: {e}");
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
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
fn report(result: Result<String, (u8, String)>) -> ExitCode {
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

fn keygen(scheme: Scheme, out: &std::path::Path) -> Result<String, (u8, String)> {
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

fn approve(
    image: &str,
    key: &std::path::Path,
    config: &std::path::Path,
) -> Result<String, (u8, String)> {
    let config = Config::load(config).map_err(|e| (EXIT_CONFIG, e.to_string()))?;
    let (name, digest) = image
        .rsplit_once('@')
        .ok_or_else(|| (1, format!("{image:?} is not NAME@DIGEST")))?;
    let digest: pullgate::names::Digest = digest.parse().map_err(|e| (1, format!("{e}")))?;
    let name: pullgate::names::RepoName = name.parse().map_err(|e| (1, format!("{e}")))?;
    let router = pullgate::route::Router::for_upstreams(&config.upstreams);
    let route = router.route(&name, None).map_err(|e| (1, e.message))?;
    let pem = std::fs::read_to_string(key)
        .map_err(|e| (1, format!("cannot read {}: {e}", key.display())))?;
    let private = pullgate::keys::PrivateKey::from_pem(&pem)
        .map_err(|e| (1, format!("{}: {e}", key.display())))?;
    let path =
        pullgate::approvals::record(&config.storage.path, &route.canonical, &digest, &private)
            .map_err(|e| {
                (
                    1,
                    format!(
                        "cannot store the approval under {}: {e}",
                        config.storage.path.display()
                    ),
                )
            })?;
    let public = pullgate::keys::PublicKey::from_pem(&private.public_pem()).map_err(|e| (1, e))?;
    let trusted_as: Vec<&str> = config
        .policies
        .iter()
        .find(|p| p.matcher.is_match(&route.canonical))
        .into_iter()
        .flat_map(|p| p.signed_by.iter())
        .filter(|k| k.key.same_key(&public))
        .map(|k| k.name.as_str())
        .collect();
    let note = if trusted_as.is_empty() {
        "; note: the policy matching this name does not trust this key, so pulls are not affected until it does".to_owned()
    } else {
        format!(
            " (trusted as {:?} by the matching policy)",
            trusted_as.join(", ")
        )
    };
    Ok(format!(
        "approved {}@{digest}: {}{note}",
        route.canonical,
        path.display()
    ))
}

/// Loads a config for a command; a bad one is reported (exit 64).
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Evaluates `image` step by step (`pullgate verify` and `pin`), printing
/// each step; no verdict is exit 69.
fn explain_printed(
    config: &Config,
    image: &str,
    pins: explain::Pins,
) -> Result<explain::Explained, ExitCode> {
    let runtime =
        runtime(tokio::runtime::Builder::new_current_thread()).ok_or(ExitCode::FAILURE)?;
    let mut lines = Vec::new();
    let result = runtime.block_on(explain::explain(config, image, pins, &mut lines));
    for l in &lines {
        println!("{l}");
    }
    result.map_err(|e| {
        eprintln!("pullgate: cannot reach a verdict: {e}");
        ExitCode::from(69)
    })
}

fn verify(image: &str, config: &std::path::Path) -> ExitCode {
    let explained = load_config(config)
        .and_then(|config| explain_printed(&config, image, explain::Pins::Honour));
    match explained {
        Ok(e) if e.outcome == explain::Outcome::Allowed => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(code) => code,
    }
}

fn pin(image: &str, config_path: &std::path::Path) -> ExitCode {
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
    let e = match explain_printed(&config, image, explain::Pins::Ignore) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let (explain::Outcome::Allowed, Some(digest)) = (e.outcome, e.digest) else {
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
    let router = pullgate::route::Router::for_upstreams(&config.upstreams);
    let same: Vec<String> = pins
        .keys()
        .filter(|k| {
            pullgate::config::image_ref(k, &router)
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
    if let Err(err) = pullgate::rewrite::write_pins_file(&pins_file, &pins) {
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

/// The pins a pins file holds now, as written (an absent file has none).
fn read_pins(path: &std::path::Path) -> Result<std::collections::BTreeMap<String, String>, String> {
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

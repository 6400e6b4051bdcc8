//! `pullgate serve`: the proxy and its admin listener until SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use super::{runtime, EXIT_CONFIG};
use crate::LogFormat;
use pullgate::{App, Config, Shutdown};

/// Loads the config (or the embedded default), checks what must hold at
/// start-up, and serves.
pub fn serve(path: Option<&Path>, log_format: LogFormat) -> ExitCode {
    let config = match path {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => Config::embedded(),
    };
    // Probes that create or open files belong to start-up, not validation.
    if let Err(e) = pullgate::audit::probe(&config) {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    init_logging(log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.server.workers {
        builder.worker_threads(n);
    }
    let Some(runtime) = runtime(builder) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pullgate: {e:#}");
            ExitCode::FAILURE
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

async fn run(config: Config) -> anyhow::Result<()> {
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

    // Opening the store scans it (on the blocking pool) and asks the
    // shared bucket, when there is one.
    let app = App::start(config).await?;
    let listener = pullgate::server::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let admin = match admin_listen {
        Some(addr) => Some(
            pullgate::server::bind(addr)
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
            _ = hup.recv() => reload(&app, source_path.as_deref()).await,
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

async fn reload(app: &Arc<App>, path: Option<&Path>) {
    app.audit.reopen();
    let Some(path) = path else {
        tracing::info!("SIGHUP: running the embedded config, nothing to reload");
        return;
    };
    // Reading the file (and its key and pins files) blocks: not on a
    // worker thread.
    let owned = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&owned))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let result = loaded.and_then(|c| app.reload(c).map_err(|e| e.to_string()));
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

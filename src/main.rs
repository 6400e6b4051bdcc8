//! The `pullgate` command: parses the CLI and calls [`cli`], which calls
//! the library.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Run the proxy (registry API on [server] listen; /metrics /healthz /readyz /dashboard /api/* on [admin] listen).
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
        /// Signature scheme of the key pair (cosign's default is ECDSA P-256).
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
    /// Runs the steps of a pull with a trace (the server's store is read,
    /// nothing is written; tags are asked of the upstream) and explains the verdict: rewrites and
    /// pins applied, the policy that matched, the signatures found (which
    /// verified, why others did not), and the base the image is built on or
    /// how close it came. Exit status: 0 allowed, 1 denied, 64 bad config,
    /// 69 upstream unreachable or image not found.
    Verify {
        /// NAME[:TAG] or NAME@DIGEST, e.g. ghcr.io/acme/app:1.2
        #[arg(value_name = "IMAGE")]
        image: String,
        /// Config file (policies, keys, bases); its store is read, never written.
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
        /// Config file with a pins_file (the pin is written there).
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Write approved images into a bundle for an air-gapped site.
    ///
    /// Each reference is decided by this site's policy first (as `pullgate verify`
    /// does; the server's store is read, never written): a denied one fails the
    /// export and nothing is written. The bundle is a tar of one OCI image layout
    /// holding every platform, blob and signature artifact (the .sig tag,
    /// referrers, this site's local approvals as cosign signatures), each image
    /// named by its full reference, so `skopeo copy oci-archive:BUNDLE.tar:REF ...`
    /// reads it. With --key, the bundle manifest is signed (cosign simple-signing).
    /// Exit status: 0 written, 1 a reference is denied, 64 bad config or
    /// arguments, 69 an upstream or the store failed.
    Export {
        /// Config file (upstreams, policies, keys); its store is read.
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
        /// The bundle to write (replaced only when complete).
        #[arg(long, value_name = "BUNDLE.tar")]
        out: PathBuf,
        /// Private key that signs the bundle (e.g. PREFIX.key from `pullgate keygen`).
        #[arg(long, value_name = "PREFIX.key")]
        key: Option<PathBuf>,
        /// A file of references, one per line (# comments).
        #[arg(long, value_name = "LIST")]
        from: Option<PathBuf>,
        /// NAME[:TAG] or NAME@DIGEST, e.g. docker.io/library/alpine:3.20
        #[arg(value_name = "REF")]
        refs: Vec<String>,
    },
    /// Bring a bundle into the store, verified again under this site's policy.
    ///
    /// Runs beside a server on the same store, which serves the images as soon as
    /// the import ends. The bundle signature is checked against [bundles]
    /// signed_by, every blob is hashed, and every image is decided by this site's
    /// policy from the bundle's content alone; nothing becomes visible unless all
    /// of it passes. A tag that would move back to an older bundle's digest is
    /// refused unless --allow-rollback. A kill at any moment leaves the store
    /// consistent. Exit status: 0 imported, 1 bad bundle or an image refused
    /// (each named), 64 bad config, 74 the store failed, 75 committed but the
    /// running server has not applied it yet.
    Import {
        /// Config file (usually with offline upstreams); its store receives the images.
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
        /// Let tags move back to the digests of an older bundle.
        #[arg(long)]
        allow_rollback: bool,
        /// The bundle (from `pullgate export`).
        #[arg(value_name = "BUNDLE.tar")]
        bundle: PathBuf,
    },
    /// Verify one sigstore bundle offline (the sigstore-conformance CLI protocol).
    ///
    /// Keyless: the bundle's Fulcio certificate must chain to a CA of the
    /// trusted root valid at the signing time, carry an SCT from a trusted CT
    /// log and the given identity (its SAN, exactly) and OIDC issuer; the entry
    /// must be in a trusted transparency log (a signed entry timestamp, or an
    /// inclusion proof with a checkpoint), and the signature must verify over
    /// the artifact. With --key, the signature must verify with that key. The
    /// trusted root is the sigstore production root embedded in pullgate
    /// unless --trusted-root names one; nothing is fetched. FILE_OR_DIGEST is
    /// the artifact's path, or `sha256:<hex>` when no such file exists. Exit
    /// status: 0 verified, 1 not verified (the reason on stderr), 2 a usage
    /// error, 64 a trusted root or key that cannot be used.
    VerifyBundle {
        /// Use the embedded sigstore staging root instead of production.
        #[arg(long)]
        staging: bool,
        /// The sigstore bundle (JSON).
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// The identity the signing certificate must name (its SAN), exactly.
        #[arg(
            long,
            value_name = "IDENTITY",
            requires = "certificate_oidc_issuer",
            conflicts_with = "key"
        )]
        certificate_identity: Option<String>,
        /// The OIDC issuer the signing certificate must name, exactly.
        #[arg(long, value_name = "URL", requires = "certificate_identity")]
        certificate_oidc_issuer: Option<String>,
        /// A PEM public key the signature must verify with (instead of an identity).
        #[arg(long, value_name = "PATH_TO_KEY")]
        key: Option<PathBuf>,
        /// A trusted_root.json to use instead of the embedded one.
        #[arg(long, value_name = "FILE")]
        trusted_root: Option<PathBuf>,
        /// The signed file, or its digest as sha256:<hex>.
        #[arg(value_name = "FILE_OR_DIGEST")]
        artifact: String,
    },
    /// Check every file of the store against its digest, and the metadata
    /// (manifest markers, tags, approvals, base history) against the blobs.
    ///
    /// What is wrong (bit rot, a disk that lied, a stray file) is moved to
    /// quarantine/<time>/ in the store, at its relative path, and listed. Safe
    /// beside a running server, which fetches what it then misses again.
    /// Without a server, temp files of the one that stopped are removed.
    /// With [storage.s3], the shared bucket is checked too: every blob hashed
    /// (it reads the whole bucket), tag records and approvals parsed, and what
    /// is wrong moved under quarantine/<time>/ in the bucket.
    /// Exit status: 0 no problems, 1 problems found (and moved aside),
    /// 64 bad config, 74 the store or the bucket cannot be read.
    Fsck {
        /// Config file whose [storage] path (and [storage.s3] bucket) is checked.
        #[arg(short, long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Write containerd's certs.d hosts.toml files that send every pull through pullgate.
    ///
    /// Writes DIR/_default/hosts.toml with pullgate as the `server` (never a
    /// [host] mirror, which containerd would skip on a 403), atomically. Each
    /// --direct registry gets a file of its own that pulls from it directly:
    /// use it only for the registry that serves pullgate's own image, pinned by
    /// digest, so that the mirror can start without itself. A hosts.toml not
    /// written by pullgate is never overwritten; other registries' files, which
    /// containerd would use instead of _default, are warned about. The
    /// Kubernetes DaemonSet runs this in a sidecar (deploy/kubernetes/) with
    /// --after-ready, so the files appear once pullgate serves. Exit status: 0 done,
    /// 1 a foreign _default file is in the way, 64 bad arguments, 73 a file
    /// cannot be written.
    ContainerdHosts {
        /// containerd's hosts directory (config_path), e.g. /etc/containerd/certs.d
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// pullgate's registry address as containerd on the node reaches it.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:5000")]
        server: String,
        /// A registry pulled directly, e.g. https://ghcr.io (repeatable).
        #[arg(long, value_name = "URL")]
        direct: Vec<String>,
        /// Remove the files this command wrote (only those) instead.
        #[arg(long, conflicts_with = "direct")]
        remove: bool,
        /// First wait until this URL answers 200 (pullgate's /readyz), so that the
        /// files go down only once pullgate serves.
        #[arg(long, value_name = "URL")]
        after_ready: Option<String>,
        /// Then keep running until SIGTERM (for a container of a DaemonSet).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Copy, Clone, ValueEnum)]
pub enum Scheme {
    Ed25519,
    EcdsaP256,
}

#[derive(Copy, Clone, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, config } => match file.or(config) {
            Some(file) => cli::check_config(&file),
            None => ExitCode::from(cli::EXIT_CONFIG),
        },
        Command::Keygen { scheme, out } => cli::report(cli::keygen(scheme, &out)),
        Command::Verify { image, config } => cli::verify(&image, &config),
        Command::Pin { image, config } => cli::pin(&image, &config),
        Command::Approve { image, key, config } => cli::report(cli::approve(&image, &key, &config)),
        Command::Fsck { config } => cli::fsck(&config),
        Command::Export {
            config,
            out,
            key,
            from,
            refs,
        } => cli::export(&config, &out, key.as_deref(), &refs, from.as_deref()),
        Command::Import {
            config,
            allow_rollback,
            bundle,
        } => cli::import(&config, &bundle, allow_rollback),
        Command::ContainerdHosts {
            dir,
            server,
            direct,
            remove,
            after_ready,
            wait,
        } => cli::containerd_hosts(&cli::Hosts {
            dir: &dir,
            server: &server,
            direct: &direct,
            remove,
            wait,
            after_ready: after_ready.as_deref(),
        }),
        Command::VerifyBundle {
            staging,
            bundle,
            certificate_identity,
            certificate_oidc_issuer,
            key,
            trusted_root,
            artifact,
        } => cli::verify_bundle(&cli::VerifyBundleArgs {
            staging,
            bundle: &bundle,
            identity: certificate_identity.as_deref(),
            issuer: certificate_oidc_issuer.as_deref(),
            key: key.as_deref(),
            trusted_root: trusted_root.as_deref(),
            artifact: &artifact,
        }),
        Command::Serve { config } => cli::serve(config.as_deref(), cli.log_format),
    }
}

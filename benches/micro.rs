//! Criterion micro-benchmarks of pullgate's hot paths: route parsing, digest
//! hashing, store lookups, a whole cached manifest request through the
//! pipeline (no network), signature and base checks, and the cost of
//! configured rewrites and pins.
//!
//! Run: `cargo bench --bench micro`

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::Request;
use http_body_util::Empty;

use pullgate::names::{Digest, Hasher};
use pullgate::oci::Manifest;
use pullgate::route::{parse_path, PathKind, Router};
use pullgate::store::{TagKey, TagRecord};
use pullgate::{App, Config};

// The tests' own sigstore (CA, CT log, transparency log), for a keyless
// bundle to verify.
#[path = "../tests/sigstore_pki/mod.rs"]
mod sigstore_pki;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A 1.5 KB image manifest (the size of a typical one).
fn a_manifest() -> Manifest {
    let config = Digest::of(b"config");
    let layers: Vec<_> = (0..8)
        .map(|n| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": Digest::of(format!("layer {n}").as_bytes()).to_string(), "size": 1000 + n})
        })
        .collect();
    let bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 6},
        "layers": layers,
    }))
    .unwrap();
    Manifest::parse(Digest::of(&bytes), None, Bytes::from(bytes)).unwrap()
}

/// Records a fresh tag.
fn put_tag(rt: &tokio::runtime::Runtime, app: &App, key: &TagKey, digest: Digest) {
    rt.block_on(app.store.update_tag(
        key,
        Box::new(move |_| {
            Some(TagRecord {
                digest,
                checked: SystemTime::now(),
                approved: None,
            })
        }),
    ))
    .unwrap();
}

fn routing(c: &mut Criterion) {
    let router = Router::new([
        ("docker.io", true),
        ("ghcr.io", false),
        ("quay.io", false),
        ("gcr.io", false),
        ("registry.k8s.io", false),
    ]);
    c.bench_function("route: parse + route a manifest path", |b| {
        b.iter(|| {
            let PathKind::Repo { name, .. } =
                parse_path(black_box("/v2/ghcr.io/acme/team/app/manifests/v1.2.3")).unwrap()
            else {
                unreachable!()
            };
            black_box(router.route(&name, None).unwrap())
        })
    });
}

fn hashing(c: &mut Criterion) {
    let data = vec![7u8; 1 << 20];
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256 of 1 MiB", |b| {
        b.iter(|| {
            let mut h = Hasher::new();
            h.update(black_box(&data));
            black_box(h.finish())
        })
    });
    g.finish();
}

/// An app with one cached manifest and a fresh tag pointing at it, under
/// `policy` (a `[[policy]]` table) and any `extra` tables (`[keys]`).
fn app_with_cached_manifest(
    dir: &std::path::Path,
    extra: &str,
    policy: &str,
) -> (Arc<App>, Digest) {
    let text = format!(
        "{extra}\n[storage]\npath = \"{}\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n{policy}",
        dir.join("data").display()
    );
    let app = App::new(Config::parse(&text, "bench", dir).unwrap()).unwrap();
    let m = a_manifest();
    let digest = m.digest;
    let rt = runtime();
    rt.block_on(app.store.put_manifest(Arc::new(m))).unwrap();
    let key = TagKey {
        upstream: Arc::from("docker.io"),
        repo: "library/alpine".parse().unwrap(),
        tag: "3.20".parse().unwrap(),
    };
    put_tag(&rt, &app, &key, digest);
    (app, digest)
}

/// The cached manifest request every handler benchmark sends.
fn cached_request() -> Request<Empty<Bytes>> {
    Request::get("/v2/library/alpine/manifests/3.20?ns=docker.io")
        .body(Empty::<Bytes>::new())
        .unwrap()
}

/// Benchmarks the cached manifest request on `app`, then on a plain app
/// (no requirements, no rewrites) built at this point of the process.
/// Later benchmarks in one process measure a little slower (heap state), so
/// a figure is compared with the baseline measured right after it.
fn bench_with_baseline(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    app: &Arc<App>,
    baseline: &str,
) {
    let plain_dir = tempfile::tempdir().unwrap();
    let (plain, _) = app_with_cached_manifest(
        plain_dir.path(),
        "",
        "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
    );
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    for (name, app) in [(name, app), (baseline, &plain)] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let resp = rt.block_on(app.clone().handle(cached_request(), peer));
                assert_eq!(resp.status(), 200);
                black_box(resp)
            })
        });
    }
}

fn store_and_handler(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (app, digest) = app_with_cached_manifest(
        dir.path(),
        "",
        "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
    );
    let key = TagKey {
        upstream: Arc::from("docker.io"),
        repo: "library/alpine".parse().unwrap(),
        tag: "3.20".parse().unwrap(),
    };
    c.bench_function("store: tag + manifest lookup (cached)", |b| {
        b.iter(|| {
            let rec = app.store.cached_tag(black_box(&key)).unwrap();
            black_box(app.store.cached_manifest(&rec.digest).unwrap())
        })
    });
    let _ = digest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    c.bench_function("handler: cached manifest by tag", |b| {
        b.iter(|| {
            let resp = rt.block_on(app.clone().handle(cached_request(), peer));
            assert_eq!(resp.status(), 200);
            black_box(resp)
        })
    });
}

fn signatures(c: &mut Criterion) {
    use pullgate::cosign;
    use pullgate::keys::{PrivateKey, PublicKey};
    let image = Digest::of(b"image manifest");
    for scheme in ["ecdsa-p256", "ed25519"] {
        let key = PrivateKey::generate(scheme).unwrap();
        let public = PublicKey::from_pem(&key.public_pem()).unwrap();
        let payload = cosign::payload("ghcr.io/acme/app", &image);
        let (manifest, _) = cosign::signature_manifest(&[(payload.clone(), key.sign(&payload))]);
        let layer = cosign::parse_signature_manifest(&manifest)
            .unwrap()
            .remove(0);
        c.bench_function(&format!("verify: legacy .sig signature, {scheme}"), |b| {
            b.iter(|| black_box(cosign::check(&layer, &payload, &image, &[&public]).unwrap()))
        });
        let bundle = cosign::bundle(&image, "ghcr.io/acme/app", |m| key.sign(m));
        c.bench_function(&format!("verify: v3 bundle (DSSE), {scheme}"), |b| {
            b.iter(|| black_box(cosign::check_bundle(&bundle, &image, &[&public]).unwrap()))
        });
    }
}

/// One keyless bundle (certificate chain, SCT, signed entry timestamp,
/// signature, identity) through `pullgate::keyless`, the verifier built once
/// as a server would hold it.
fn keyless(c: &mut Criterion) {
    use pullgate::keyless::{Expect, Keyless, Root, Signed};
    let store = sigstore_pki::Sigstore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trusted_root.json");
    std::fs::write(&root, store.trusted_root()).unwrap();
    let verifier = Keyless::new(Root::File(&root)).unwrap();
    let artifact = b"a simple-signing payload".to_vec();
    let bundle = store.bundle(
        &artifact,
        &store.signing("ci@acme.example", "https://issuer.example"),
    );
    let expect = Expect::Identity {
        identity: "ci@acme.example".into(),
        issuer: "https://issuer.example".into(),
    };
    c.bench_function("verify: keyless bundle (chain, SCT, SET, identity)", |b| {
        b.iter(|| {
            black_box(
                verifier
                    .verify(&bundle, Signed::Bytes(&artifact), &expect)
                    .unwrap(),
            )
        })
    });
}

/// The cached manifest request again, under a policy that requires a
/// signature (satisfied by a local approval, so no upstream is needed): the
/// difference to the plain figure is the cached verdict.
fn cached_verdict(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = pullgate::keys::PrivateKey::generate("ed25519").unwrap();
    std::fs::write(dir.path().join("k.pub"), key.public_pem()).unwrap();
    let (app, digest) = app_with_cached_manifest(
        dir.path(),
        "[keys]\nk = \"k.pub\"",
        "[[policy]]\nname = \"signed\"\nmatch = [\"**\"]\nsigned_by = [\"k\"]\n",
    );
    let rt = runtime();
    rt.block_on(pullgate::approvals::record(
        &*app.store,
        "docker.io/library/alpine",
        &digest,
        &key,
    ))
    .unwrap();
    // The first request reaches the verdict; the rest find it cached.
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert_eq!(
        rt.block_on(app.clone().handle(cached_request(), peer))
            .status(),
        200
    );
    bench_with_baseline(
        c,
        &rt,
        "handler: cached manifest by tag, signed_by policy (cached verdict)",
        &app,
        "handler: cached manifest by tag, paired baseline (no requirements)",
    );
}

/// The base check of a fresh verdict once the base manifests are cached: a
/// 30-layer image against 10 base images (6 layers each), on the last one
/// checked (the worst case), as a pure prefix compare and with the manifest
/// parse in front.
fn base_check(c: &mut Criterion) {
    use pullgate::bases::{check_manifest, BaseImage, BaseTable, Source};
    use pullgate::oci::Platform;
    let layer = |set: usize, n: usize| Digest::of(format!("{set}/{n}").as_bytes());
    let mut table = BaseTable::default();
    for set in 0..10 {
        table.images.push(BaseImage {
            set: Arc::from(format!("base{set}").as_str()),
            image: Arc::from(format!("gcr.io/base{set}:latest").as_str()),
            digest: layer(set, 999),
            platform: None,
            layers: (0..6).map(|n| layer(set, n)).collect(),
        });
        table.source.push(pullgate::config::BaseSet {
            name: format!("base{set}"),
            images: Vec::new(),
        });
    }
    let sets: Vec<String> = (0..10).map(|s| format!("base{s}")).collect();
    let image: Vec<Digest> = (0..30)
        .map(|n| if n < 6 { layer(9, n) } else { layer(100, n) })
        .collect();
    c.bench_function("bases: prefix check, 30 layers vs 10 bases", |b| {
        b.iter(|| black_box(table.check(black_box(&sets), black_box(&image), None)))
    });
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer(0, 1000).to_string(), "size": 1000},
        "layers": image.iter().map(|d| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": 12345678
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest = Bytes::from(manifest);
    let digest = Digest::of(&manifest);
    struct NoFetch;
    impl Source for NoFetch {
        async fn manifest(&self, _: Digest) -> Result<Arc<Manifest>, pullgate::bases::BaseError> {
            Err(pullgate::bases::BaseError::Unreadable("not needed".into()))
        }
        async fn platform(&self, _: Digest) -> Option<Platform> {
            None
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The parse happens once per manifest, when it arrives (from the
    // upstream, the store or a bundle); a fresh verdict reads the parsed one.
    c.bench_function("oci: parse a 30-layer image manifest (oci-spec)", |b| {
        b.iter(|| black_box(Manifest::parse(digest, None, black_box(manifest.clone())).unwrap()))
    });
    let m = Manifest::parse(digest, None, manifest.clone()).unwrap();
    c.bench_function("bases: check a parsed 30-layer manifest vs 10 bases", |b| {
        b.iter(|| {
            let out = rt
                .block_on(check_manifest(&table, &sets, black_box(&m), &NoFetch))
                .unwrap();
            assert!(out.passes);
            black_box(out)
        })
    });
}

/// The cached manifest request under a policy that requires a base image:
/// the first request reaches the verdict (base table built from a base
/// stored by digest, so no upstream is needed), the rest find it cached.
fn cached_base_verdict(c: &mut Criterion) {
    let manifest = |layers: &[Digest]| {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of(b"config").to_string(), "size": 6},
            "layers": layers.iter().map(|d| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": 1000
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        Manifest::parse(Digest::of(&bytes), None, Bytes::from(bytes)).unwrap()
    };
    let layers: Vec<Digest> = (0..30)
        .map(|n| Digest::of(format!("l{n}").as_bytes()))
        .collect();
    let base = manifest(&layers[..5]);
    let image = manifest(&layers);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[storage]\npath = \"{}\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n\
         [bases]\nmine = [\"docker.io/library/base@{}\"]\n\
         [[policy]]\nname = \"on base\"\nmatch = [\"**\"]\nbases = [\"mine\"]\n",
        dir.path().join("data").display(),
        base.digest
    );
    let app = App::new(Config::parse(&text, "bench", dir.path()).unwrap()).unwrap();
    let image_digest = image.digest;
    let rt = runtime();
    rt.block_on(app.store.put_manifest(Arc::new(base))).unwrap();
    rt.block_on(app.store.put_manifest(Arc::new(image)))
        .unwrap();
    let key = TagKey {
        upstream: Arc::from("docker.io"),
        repo: "library/alpine".parse().unwrap(),
        tag: "3.20".parse().unwrap(),
    };
    put_tag(&rt, &app, &key, image_digest);
    rt.block_on(app.refresh_bases());
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert_eq!(
        rt.block_on(app.clone().handle(cached_request(), peer))
            .status(),
        200
    );
    bench_with_baseline(
        c,
        &rt,
        "handler: cached manifest by tag, bases policy (cached verdict)",
        &app,
        "handler: cached manifest by tag, paired baseline (no bases)",
    );
}

/// The cached manifest request with 100 rewrite rules and 1000 pins
/// configured, none of them for the name pulled: the cost of the lookups.
fn rewrites_and_pins(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = String::from("[pins]\n");
    for i in 0..1000 {
        extra.push_str(&format!(
            "\"docker.io/library/img{i}:1\" = \"{}\"\n",
            Digest::of(format!("{i}").as_bytes())
        ));
    }
    let mut rules = String::new();
    for i in 0..100 {
        rules.push_str(&format!(
            "[[rewrite]]\nfrom = \"docker.io/team{i}/**\"\nto = \"docker.io/mirror/team{i}/**\"\n"
        ));
    }
    let (app, _) = app_with_cached_manifest(
        dir.path(),
        &extra,
        &format!("{rules}[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n"),
    );
    let config = app.config();
    let rewrites = pullgate::route::rewrite::Rewrites::new(&config.rewrites);
    c.bench_function("rewrite: apply, 100 rules, no match", |b| {
        b.iter(|| black_box(rewrites.apply(black_box("docker.io/library/alpine"))))
    });
    c.bench_function("pins: get, 1000 pins, no match", |b| {
        b.iter(|| {
            black_box(
                config
                    .pins
                    .get(black_box("docker.io/library/alpine"), black_box("3.20")),
            )
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bench_with_baseline(
        c,
        &rt,
        "handler: cached manifest by tag, 100 rewrites + 1000 pins configured",
        &app,
        "handler: cached manifest by tag, paired baseline (no rewrites or pins)",
    );
}

criterion_group!(
    benches,
    routing,
    hashing,
    store_and_handler,
    signatures,
    keyless,
    cached_verdict,
    base_check,
    cached_base_verdict,
    rewrites_and_pins
);
criterion_main!(benches);

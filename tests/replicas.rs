//! Gateway replicas on one bucket: real `pullgate serve` processes in front
//! of the CNCF registry, sharing a bucket of a real S3 engine (SeaweedFS,
//! from the test virtualenv), pulled from with skopeo and plain HTTP.

mod real;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use real::{noise, pull, push, Layout, Registry, RegistryAuth, Seaweed};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// A `pullgate serve` with its own local tier; killed (-9) on drop.
struct Replica {
    child: Option<Child>,
    config: PathBuf,
    listen: String,
    admin: String,
    log: PathBuf,
}

impl Replica {
    /// `rest` is the config after `[storage.s3]` (upstreams, policies).
    fn start(dir: &Path, name: &str, engine: &Seaweed, rest: &str) -> Replica {
        let ports = real::free_ports(2);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[server]
listen = "127.0.0.1:{}"

[admin]
listen = "127.0.0.1:{}"

[storage]
path = "{}"
tag_ttl = "1h"

[storage.s3]
endpoint = "{}"
bucket = "pullgate"
prefix = "site"
access_key_env = "PG_S3_ACCESS"
secret_key_env = "PG_S3_SECRET"

{rest}"#,
                ports[0],
                ports[1],
                dir.join(format!("{name}-tier")).display(),
                engine.endpoint(),
            ),
        )
        .unwrap();
        let mut r = Replica {
            child: None,
            config,
            listen: format!("127.0.0.1:{}", ports[0]),
            admin: format!("127.0.0.1:{}", ports[1]),
            log: dir.join(format!("{name}.log")),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("PG_S3_ACCESS", real::S3_ACCESS_KEY)
            .env("PG_S3_SECRET", real::S3_SECRET_KEY)
            .env("RUST_LOG", "info")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_status(&self.admin, "/readyz") == Some(200) {
                return;
            }
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("pullgate exited ({s}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The sum of the metric lines that start with `prefix`.
    fn metric(&self, prefix: &str) -> f64 {
        let text = http_get(&self.admin, "/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until every blob this replica committed is in the bucket.
    fn uploaded(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.metric("pullgate_bucket_uploads_pending") > 0.0 {
            assert!(
                Instant::now() < deadline,
                "uploads pending:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One plain HTTP/1.1 GET; the status and body.
fn get(addr: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let end = all.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = all[end + 4..].to_vec();
    // Chunked bodies are only the small admin answers; blobs have a length.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    Some((status, body))
}

/// Sends `request` as written; what came back, as text.
fn raw(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if len == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + len]);
        b = &b[nl + 2 + len + 2..];
    }
    out
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    get(addr, path).map(|(s, _)| s)
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    get(addr, path).map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
}

fn upstream(registry: &Registry) -> String {
    format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        registry.url()
    )
}

const ALLOW_ALL: &str = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";

/// Writes an approver key pair (`approver.pub`, `approver.key` in `w`);
/// the config after `[storage.s3]`: the registry as docker.io, and
/// `library/held` served only when that key approved it.
fn held_by_approver(w: &Path, seed: u8, registry: &Registry) -> String {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let approver = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    let public = approver.verifying_key().to_public_key_pem(LineEnding::LF);
    std::fs::write(w.join("approver.pub"), public.unwrap()).unwrap();
    let private = approver.to_pkcs8_pem(LineEnding::LF).unwrap();
    std::fs::write(w.join("approver.key"), private.as_bytes()).unwrap();
    format!(
        "{}\n[keys]\napprover = \"{}\"\n\n[[policy]]\nname = \"held\"\nmatch = [\"docker.io/library/held\"]\nsigned_by = [\"approver\"]\n\n{ALLOW_ALL}",
        upstream(registry),
        w.join("approver.pub").display()
    )
}

/// `pullgate approve` of `library/held@digest` with the approver key,
/// through `via`'s config; what it printed (it must succeed).
fn approve(w: &Path, via: &Replica, digest: &str) -> String {
    let key = w.join("approver.key");
    let image = format!("docker.io/library/held@{digest}");
    let (ok, said) = command(
        via,
        "approve",
        &["--key".as_ref(), key.as_ref(), image.as_ref()],
    );
    assert!(ok, "{said}");
    said
}

/// `pullgate <cmd> --config <via's> <args>` with the bucket's keys: whether
/// it succeeded, and what it said.
fn command(via: &Replica, cmd: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(BIN)
        .args([cmd, "--config"])
        .arg(&via.config)
        .args(args)
        .env("PG_S3_ACCESS", real::S3_ACCESS_KEY)
        .env("PG_S3_SECRET", real::S3_SECRET_KEY)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// The test bucket, straight (not through pullgate).
fn s3_client(engine: &Seaweed) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(engine.endpoint())
        .with_bucket_name("pullgate")
        .with_region("us-east-1")
        .with_access_key_id(real::S3_ACCESS_KEY)
        .with_secret_access_key(real::S3_SECRET_KEY)
        .with_allow_http(true)
        .build()
        .unwrap()
}

/// Every blob in the bucket, each checked against its name (one removed
/// between the listing and its read is left out).
async fn bucket_blobs(engine: &Seaweed) -> Vec<(String, usize)> {
    use futures_util::TryStreamExt;
    use object_store::ObjectStore;
    let store = s3_client(engine);
    let prefix = object_store::path::Path::from("site/blobs/sha256");
    let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut out = Vec::new();
    for meta in listed {
        let bytes = match store.get(&meta.location).await {
            Ok(got) => got.bytes().await.unwrap(),
            // Evicted since it was listed.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => panic!("{}: {e}", meta.location),
        };
        let name = meta.location.filename().unwrap().to_owned();
        assert_eq!(
            real::sha(&bytes),
            format!("sha256:{name}"),
            "{} holds bytes of another digest",
            meta.location
        );
        out.push((format!("sha256:{name}"), bytes.len()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_cached_every_replica_serves_with_the_upstream_gone() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let engine = Seaweed::start(&w.join("engine"));

    // An image with a small layer and one large enough for a multipart
    // upload, and an unsigned image a policy asks an approval for.
    let mut layout = Layout::new(&w.join("src"));
    let image = layout.image(
        "amd64",
        &[("small", noise(1000, 1)), ("large", noise(20 << 20, 2))],
    );
    layout.tag("v1", &image);
    let held = layout.image("amd64", &[("held", noise(3000, 3))]);
    layout.tag("held", &held);
    for (tag, repo) in [("v1", "library/app"), ("held", "library/held")] {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/{repo}:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
    let rest = held_by_approver(w, 7, &registry);
    let a = Replica::start(w, "a", &engine, &rest);
    let b = Replica::start(w, "b", &engine, &rest);

    // Through A: the image is cached, and goes up to the bucket.
    pull(
        w,
        &format!("{}/library/app:v1", a.listen),
        &w.join("via-a"),
        &[],
    )
    .unwrap();
    a.uploaded();
    let in_bucket = bucket_blobs(&engine).await;
    for (d, size) in &layout.blobs[..3] {
        assert!(
            in_bucket.contains(&(d.clone(), *size)),
            "{d} not in the bucket: {in_bucket:?}"
        );
    }

    // An approval recorded through A's config is seen by B, which never
    // saw the image: held is denied there, approved, then served there.
    let (status, _) = get(
        &b.listen,
        &format!("/v2/library/held/manifests/{}", held.digest),
    )
    .unwrap();
    assert_eq!(status, 403, "unapproved image served:\n{}", b.log());
    let said = approve(w, &a, &held.digest);
    assert!(said.contains("s3://pullgate/site"), "where it went: {said}");
    let (status, _) = get(
        &b.listen,
        &format!("/v2/library/held/manifests/{}", held.digest),
    )
    .unwrap();
    assert_eq!(status, 200, "approved image refused:\n{}", b.log());

    // The upstream gone: B serves the image A cached, by tag, whole.
    registry.stop();
    let upstream_before = b.metric("pullgate_upstream_requests_total");
    let via_b = w.join("via-b");
    pull(w, &format!("{}/library/app:v1", b.listen), &via_b, &[])
        .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));
    let mut every: Vec<String> = layout.blobs[..4].iter().map(|(d, _)| d.clone()).collect();
    every.push(image.digest.clone());
    real::assert_same_blobs(&layout, &via_b, &every);
    assert_eq!(
        b.metric("pullgate_upstream_requests_total"),
        upstream_before,
        "B asked the upstream"
    );
    assert!(b.metric("pullgate_bucket_requests_total{op=\"read_blob\",result=\"ok\"}") >= 2.0);
    // A replica that holds nothing answers a HEAD from the bucket.
    let c = Replica::start(w, "c", &engine, &rest);
    let large = &image.layers[1];
    let head = raw(
        &c.listen,
        &format!(
            "HEAD /v2/library/app/blobs/{large} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{}", c.log());
    let size = layout.blobs.iter().find(|(d, _)| d == large).unwrap().1;
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {size}")),
        "{head}"
    );
    assert!(b.metric("pullgate_bucket_requests_total{op=\"tag\",result=\"ok\"}") >= 1.0);
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_through_three_replicas_cost_one_upstream_fetch_in_all() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let engine = Seaweed::start(&w.join("engine"));
    let mut layout = Layout::new(&w.join("src"));
    let image = layout.image("amd64", &[("big", noise(24 << 20, 9))]);
    layout.tag("v1", &image);
    push(
        w,
        &layout.dir,
        "v1",
        &format!("{}/library/big:v1", registry.addr),
        &["--dest-tls-verify=false"],
    );
    let rest = format!("{}\n{ALLOW_ALL}", upstream(&registry));
    let replicas: Vec<_> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| Replica::start(w, n, &engine, &rest))
        .collect();
    let layer = image.layers[0].clone();
    let want = std::fs::read(layout.dir.join("blobs/sha256").join(&layer[7..])).unwrap();
    // 8 clients on each replica, all at once.
    let threads: Vec<_> = replicas
        .iter()
        .flat_map(|r| (0..8).map(move |_| r.listen.clone()))
        .map(|addr| {
            let path = format!("/v2/library/big/blobs/{layer}");
            std::thread::spawn(move || get(&addr, &path))
        })
        .collect();
    for t in threads {
        let (status, body) = t.join().unwrap().expect("an answer");
        assert_eq!(status, 200);
        assert!(body == want, "a client got other bytes");
    }
    let fetches = real::count_lines(
        &registry.log(),
        &format!("\"GET /v2/library/big/blobs/{layer}"),
    );
    println!("upstream GETs of the layer for 24 clients on 3 replicas: {fetches}");
    // One replica takes the lease and fetches; the others wait for its copy
    // in the bucket.
    assert_eq!(fetches, 1, "{fetches} upstream fetches for 3 replicas");
    // The two others read it from the bucket: most often by waiting on the
    // lease, or directly when their first request came after the upload.
    let from_bucket: f64 = replicas
        .iter()
        .map(|r| {
            r.metric("pullgate_bucket_requests_total{op=\"lease\",result=\"waited\"}")
                + r.metric("pullgate_bucket_requests_total{op=\"read_blob\",result=\"ok\"}")
        })
        .sum();
    assert!(
        from_bucket >= 2.0,
        "{from_bucket} reads of the leaseholder's copy"
    );
    for r in &replicas {
        r.uploaded();
    }
    let blobs = bucket_blobs(&engine).await;
    assert!(blobs.contains(&(layer.clone(), want.len())), "{blobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_buckets_max_size_the_least_recently_used_blobs_go_and_come_back_from_the_upstream(
) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let engine = Seaweed::start(&w.join("engine"));
    // Three images of one 5 MiB layer each (streamed from the bucket, not
    // copied whole); the bucket may hold 12 MiB: two of them.
    let mut layout = Layout::new(&w.join("src"));
    let images: Vec<_> = (0..3u64)
        .map(|i| {
            let image = layout.image("amd64", &[("l", noise(5 << 20, 40 + i))]);
            layout.tag(&format!("v{i}"), &image);
            push(
                w,
                &layout.dir,
                &format!("v{i}"),
                &format!("{}/library/lru:v{i}", registry.addr),
                &["--dest-tls-verify=false"],
            );
            image
        })
        .collect();
    let rest = format!(
        "max_size = \"12MiB\"\nmin_idle = \"2s\"\n\n{}\n{ALLOW_ALL}",
        upstream(&registry)
    );
    let a = Replica::start(w, "a", &engine, &rest);
    let b = Replica::start(w, "b", &engine, &rest);
    let pull_via = |r: &Replica, i: usize| {
        pull(
            w,
            &format!("{}/library/lru:v{i}", r.listen),
            // (A colon would end the layout's path.)
            &w.join(format!("pulled-{}-{i}", r.listen.replace(':', "-"))),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", r.log()));
        r.uploaded();
    };
    let layer = |i: usize| images[i].layers[0].clone();
    let idle = || std::thread::sleep(Duration::from_secs(3));

    // v0 through A, then v1 through B; then B reads v0's layer from the
    // bucket, so v1's is the least recently used.
    pull_via(&a, 0);
    idle();
    pull_via(&b, 1);
    idle();
    let (status, _) = get(&b.listen, &format!("/v2/library/lru/blobs/{}", layer(0))).unwrap();
    assert_eq!(status, 200);
    assert!(b.metric("pullgate_bucket_requests_total{op=\"read_blob\",result=\"ok\"}") >= 1.0);
    idle();
    // v2 takes the bucket over 12 MiB: a pass (every 2 s here) evicts.
    pull_via(&a, 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let held = bucket_blobs(&engine).await;
        if !held.iter().any(|(d, _)| *d == layer(1)) {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "v1's layer still in the bucket:\n{}\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let total: usize = held.iter().map(|(_, n)| n).sum();
    assert!(total <= 12 << 20, "{total} bytes left in the bucket");
    for d in [layer(0), layer(2)] {
        assert!(
            held.iter().any(|(h, _)| *h == d),
            "{d} was evicted: {held:?}"
        );
    }
    for image in &images {
        assert!(
            held.iter().any(|(h, _)| *h == image.digest),
            "manifest {} was evicted",
            image.digest
        );
    }
    let evicted = a.metric("pullgate_evictions_total{reason=\"bucket_max_size\"}")
        + b.metric("pullgate_evictions_total{reason=\"bucket_max_size\"}");
    assert!(evicted >= 1.0, "no eviction counted");
    assert!(a.metric("pullgate_bucket_size_bytes") > 0.0);
    let said = a.log() + &b.log();
    assert!(
        said.contains("evicted least recently used blobs from the shared bucket"),
        "{said}"
    );

    // Evicted from the bucket is not gone: B still serves it from its
    // local tier, and A, which never had it, fetches it again.
    let (status, body) = get(&b.listen, &format!("/v2/library/lru/blobs/{}", layer(1))).unwrap();
    assert_eq!(status, 200);
    let want = std::fs::read(layout.dir.join("blobs/sha256").join(&layer(1)[7..])).unwrap();
    assert!(body == want, "B served other bytes");
    let fetches = || {
        real::count_lines(
            &registry.log(),
            &format!("\"GET /v2/library/lru/blobs/{}", layer(1)),
        )
    };
    assert_eq!(fetches(), 1);
    pull_via(&a, 1);
    assert_eq!(
        fetches(),
        2,
        "A fetched v1's layer from the upstream again:\n{}\n{}",
        a.log(),
        registry.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_leaves_only_whole_blobs_in_the_bucket() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let engine = Seaweed::start(&w.join("engine"));
    let mut layout = Layout::new(&w.join("src"));
    // Killed at different moments after the fetch started: while the blob
    // is fetched and its parts go up, as its upload completes, after.
    let mut layers = Vec::new();
    for (i, delay) in [100u64, 300, 600, 1500].iter().enumerate() {
        let image = layout.image("amd64", &[("big", noise(80 << 20, 20 + i as u64))]);
        let tag = format!("v{i}");
        layout.tag(&tag, &image);
        push(
            w,
            &layout.dir,
            &tag,
            &format!("{}/library/big:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
        let d = image.layers[0].clone();
        let size = layout.blobs.iter().find(|(b, _)| *b == d).unwrap().1;
        layers.push((d, size, *delay));
    }
    let rest = format!("{}\n{ALLOW_ALL}", upstream(&registry));
    let mut a = Replica::start(w, "a", &engine, &rest);
    let mut killed_busy = 0;
    for (layer, size, delay) in &layers {
        let (addr, path) = (a.listen.clone(), format!("/v2/library/big/blobs/{layer}"));
        let client = std::thread::spawn(move || get(&addr, &path));
        let deadline = Instant::now() + Duration::from_secs(60);
        while a.metric("pullgate_inflight_fetches") < 1.0 && !client.is_finished() {
            assert!(Instant::now() < deadline, "no fetch:\n{}", a.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(*delay));
        if a.metric("pullgate_inflight_fetches") >= 1.0
            || a.metric("pullgate_bucket_uploads_pending") > 0.0
        {
            killed_busy += 1;
        }
        a.kill();
        let _ = client.join();
        // No object under a digest whose bytes do not match, and no half
        // object: whatever is listed hashes to its name, whole.
        for (d, got) in bucket_blobs(&engine).await {
            if &d == layer {
                assert_eq!(got, *size, "a partial object of {d}");
            }
        }
        a.spawn();
    }
    println!(
        "{killed_busy} of {} kills hit a running fetch or upload",
        layers.len()
    );
    assert!(
        killed_busy >= 1,
        "no kill hit a fetch or an upload:\n{}",
        a.log()
    );
    // A restarted replica uploads what its local tier holds and the bucket
    // lacks; what a kill cut off is fetched again and goes up then.
    for (layer, _, _) in &layers {
        let (status, _) = get(&a.listen, &format!("/v2/library/big/blobs/{layer}")).unwrap();
        assert_eq!(status, 200);
    }
    a.uploaded();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let blobs = bucket_blobs(&engine).await;
        if layers
            .iter()
            .all(|(l, size, _)| blobs.contains(&(l.clone(), *size)))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not uploaded: {blobs:?}\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // fsck, beside the running replica, finds the bucket clean; bit rot in
    // one blob is found and moved aside, not lost.
    let (ok, said) = fsck(&a);
    assert!(ok, "{said}");
    assert!(
        said.contains("s3://pullgate/site") && said.contains("no problems found"),
        "{said}"
    );
    let (rotten, _, _) = &layers[0];
    let store = s3_client(&engine);
    let key = object_store::path::Path::from(format!(
        "site/blobs/sha256/{}/{}",
        &rotten[7..9],
        &rotten[7..]
    ));
    object_store::ObjectStore::put(&store, &key, b"rot".to_vec().into())
        .await
        .unwrap();
    let (ok, said) = fsck(&a);
    assert!(!ok, "{said}");
    assert!(said.contains("hash to"), "{said}");
    assert!(said.contains("1 problem found in the bucket"), "{said}");
    assert!(
        !bucket_blobs(&engine).await.iter().any(|(d, _)| d == rotten),
        "still under its name"
    );
}

/// `pullgate fsck` with `via`'s config: whether it found nothing, and what
/// it said.
fn fsck(via: &Replica) -> (bool, String) {
    command(via, "fsck", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_engine_down_replicas_serve_their_local_tier_and_fail_closed() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut engine = Seaweed::start(&w.join("engine"));
    let mut layout = Layout::new(&w.join("src"));
    let cached = layout.image("amd64", &[("c", noise(5 << 20, 31))]);
    layout.tag("cached", &cached);
    let fresh = layout.image("amd64", &[("f", noise(2 << 20, 32))]);
    layout.tag("fresh", &fresh);
    let held = layout.image("amd64", &[("h", noise(4000, 33))]);
    layout.tag("held", &held);
    for (tag, repo) in [("cached", "app"), ("fresh", "app"), ("held", "held")] {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/library/{repo}:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
    let rest = held_by_approver(w, 9, &registry);
    let a = Replica::start(w, "a", &engine, &rest);
    pull(
        w,
        &format!("{}/library/app:cached", a.listen),
        &w.join("warm"),
        &[],
    )
    .unwrap();
    a.uploaded();
    approve(w, &a, &held.digest);

    engine.stop();
    // Ready no more, and the answer names the bucket.
    let (status, body) = get(&a.admin, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("s3://pullgate/site"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // Under load, what the local tier holds is served.
    for round in 0..20 {
        let (status, _) = get(&a.listen, "/v2/library/app/manifests/cached").unwrap();
        assert_eq!(status, 200, "round {round}:\n{}", a.log());
        let (status, body) = get(
            &a.listen,
            &format!("/v2/library/app/blobs/{}", cached.layers[0]),
        )
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(real::sha(&body), cached.layers[0]);
    }
    // What it does not hold comes from the upstream, as without a bucket.
    pull(
        w,
        &format!("{}/library/app:fresh", a.listen),
        &w.join("fresh"),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    // A verdict that needs the bucket's approvals fails closed.
    let (status, body) = get(
        &a.listen,
        &format!("/v2/library/held/manifests/{}", held.digest),
    )
    .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(
        status, 403,
        "served without the approval being readable: {body}"
    );
    assert!(body.contains("verification-unavailable"), "{body}");
    assert!(
        body.contains("could not be read from pullgate's store"),
        "{body}"
    );
    // Where the bucket is stays in the log.
    assert!(!body.contains(&engine.endpoint()), "{body}");
    assert!(!body.contains("s3://"), "{body}");
    assert!(a.metric("pullgate_bucket_requests_total{op=\"approval\",result=\"error\"}") >= 1.0);

    // The engine back: ready, and the approval is honoured.
    engine.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&a.admin, "/readyz") != Some(200) {
        assert!(Instant::now() < deadline, "not ready again:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = get(
            &a.listen,
            &format!("/v2/library/held/manifests/{}", held.digest),
        )
        .unwrap();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {status}:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // What was pulled while the engine was down goes up once it is back.
    assert!(a.metric("pullgate_bucket_requests_total{op=\"upload\",result=\"error\"}") >= 1.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let blobs = bucket_blobs(&engine).await;
        if blobs.iter().any(|(d, _)| *d == fresh.layers[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not uploaded after the engine came back:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn start_up_says_what_is_wrong_with_the_bucket() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let engine = Seaweed::start(&w.join("engine"));
    let config = w.join("c.toml");
    let write = |endpoint: &str, bucket: &str| {
        std::fs::write(
            &config,
            format!(
                "[storage]\npath = \"{}\"\n[storage.s3]\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\naccess_key_env = \"PG_S3_ACCESS\"\nsecret_key_file = \"secret\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n{ALLOW_ALL}",
                w.join("tier").display()
            ),
        )
        .unwrap();
    };
    let run = |access: &str, secret: &str| {
        std::fs::write(w.join("secret"), secret).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("PG_S3_ACCESS", access)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    write(&engine.endpoint(), "pullgate");
    let e = run("nobody", real::S3_SECRET_KEY);
    assert!(e.contains("does not know the access key"), "{e}");
    let e = run(real::S3_ACCESS_KEY, "wrong");
    assert!(e.contains("refused the secret key"), "{e}");
    write(&engine.endpoint(), "no-such-bucket");
    let e = run(real::S3_ACCESS_KEY, real::S3_SECRET_KEY);
    assert!(e.contains("the bucket does not exist"), "{e}");
    let dead = format!("http://127.0.0.1:{}", real::free_ports(1)[0]);
    write(&dead, "pullgate");
    let e = run(real::S3_ACCESS_KEY, real::S3_SECRET_KEY);
    assert!(e.contains("the engine does not answer"), "{e}");
    // A missing credential is a config problem, with its line.
    write(&engine.endpoint(), "pullgate");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("PG_S3_ACCESS")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("storage.s3.access_key_env: environment variable \"PG_S3_ACCESS\" is not set"),
        "{e}"
    );
}

//! Hostile input: an upstream that lies next to a real one, and clients
//! that send too much, too slowly or stop reading. Each case checks the
//! answer, that nothing wrong was stored, and that a real pull (skopeo,
//! from the real distribution registry) still works afterwards.

mod common;
mod real;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{error_code, Fake, FaultKind, Proxy};
use real::{assert_same_blobs, pull, push, Layout, Registry, RegistryAuth, Written};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A real registry as docker.io (the default) holding `library/app:1` and
/// `:2`, a hostile fake as evil.io, and pullgate in front of both.
struct Site {
    work: tempfile::TempDir,
    registry: Registry,
    layout: Layout,
    images: Vec<Written>,
    fake: Fake,
    proxy: Proxy,
}

async fn site(server: &str) -> Site {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let mut images = Vec::new();
    for tag in ["1", "2"] {
        let image = layout.image("amd64", &[("tag.txt", format!("tag {tag}\n").into_bytes())]);
        layout.tag(tag, &image);
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/library/app:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
        images.push(image);
    }
    let fake = Fake::start().await;
    let config = format!(
        r#"
[server]
{server}

[storage]
path = "data"

[[upstream]]
name = "docker.io"
url = "{registry}"
default = true

[[upstream]]
name = "evil.io"
url = "{fake}"

[[policy]]
name = "all"
match = ["**"]
"#,
        registry = registry.url(),
        fake = fake.url(),
    );
    let proxy = Proxy::with_config(Arc::new(tempfile::tempdir().unwrap()), &config).await;
    Site {
        work,
        registry,
        layout,
        images,
        fake,
        proxy,
    }
}

impl Site {
    /// The bytes of a pushed manifest.
    fn manifest_bytes(&self, image: &Written) -> Vec<u8> {
        std::fs::read(
            self.layout
                .dir
                .join("blobs/sha256")
                .join(&image.digest[7..]),
        )
        .unwrap()
    }

    /// skopeo pulls `library/app:<tag>` from the real registry through pullgate.
    fn real_pull_works(&self, tag: &str, image: &Written) {
        let out = self
            .work
            .path()
            .join(format!("out-{tag}-{}", rand_suffix()));
        let src = format!("{}/docker.io/library/app:{tag}", self.proxy.addr);
        pull(self.work.path(), &src, &out, &[]).unwrap_or_else(|e| panic!("pull {src}: {e}"));
        assert_same_blobs(&self.layout, &out, std::slice::from_ref(&image.digest));
        assert_same_blobs(&self.layout, &out, &image.layers);
    }

    /// Whether the store holds bytes under `digest`.
    fn stored(&self, digest: &str) -> bool {
        let hex = &digest[7..];
        self.proxy
            .dir
            .path()
            .join("data/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists()
    }

    async fn get(&self, path: &str, accept: &str) -> reqwest::Response {
        self.proxy
            .client
            .get(self.proxy.url(path))
            .header("Accept", accept)
            .send()
            .await
            .unwrap()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_cannot_relabel_another_upstreams_image() {
    let s = site("").await;
    let (one, two) = (&s.images[0], &s.images[1]);

    // docker.io's image is cached first; evil.io then serves its very bytes
    // labelled as an index.
    s.real_pull_works("1", one);
    s.fake
        .put_manifest("library/app", Some("1"), OCI_INDEX, s.manifest_bytes(one));
    let (status, code, body) = error_code(
        s.get("/v2/evil.io/library/app/manifests/1", ACCEPT_ALL)
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (502, "UNKNOWN"), "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("sent as") && message.contains(OCI_INDEX),
        "{message}"
    );
    // docker.io's clients still get an image manifest, by tag and digest.
    for reference in ["1", one.digest.as_str()] {
        let r = s
            .get(
                &format!("/v2/docker.io/library/app/manifests/{reference}"),
                ACCEPT_ALL,
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST, "{reference}");
    }
    s.real_pull_works("1", one);

    // The other order: evil.io's label comes first, and is refused before
    // anything is stored, so docker.io's first pull of :2 is unaffected.
    s.fake
        .put_manifest("library/app", Some("2"), OCI_INDEX, s.manifest_bytes(two));
    let r = s
        .get("/v2/evil.io/library/app/manifests/2", ACCEPT_ALL)
        .await;
    assert_eq!(r.status(), 502);
    assert!(!s.stored(&two.digest), "a refused manifest was stored");
    s.real_pull_works("2", two);
    let r = s
        .get(
            &format!("/v2/evil.io/library/app/manifests/{}", two.digest),
            ACCEPT_ALL,
        )
        .await;
    // By digest, the bytes are what they are, whoever is asked.
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_characters_and_lies_in_a_manifest_get_a_clean_502() {
    let s = site("").await;
    let config = s.fake.put_blob(b"{}".to_vec());
    let manifest = |media_type: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [],
        }))
        .unwrap()
    };
    let cases = [
        (
            "ctl",
            manifest("application/vnd.oci.image.manifest.v1+json\u{1}"),
        ),
        (
            "crlf",
            manifest("application/vnd.oci.image.manifest.v1+json\r\nX-Evil: 1"),
        ),
        ("mislabelled", manifest(OCI_INDEX)),
    ];
    for (tag, bytes) in &cases {
        let d = s
            .fake
            .put_manifest("acme/app", Some(tag), OCI_MANIFEST, bytes.clone());
        let (status, _, body) = error_code(
            s.get(&format!("/v2/evil.io/acme/app/manifests/{tag}"), ACCEPT_ALL)
                .await,
        )
        .await;
        assert_eq!(status, 502, "{tag}: {body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("unusable manifest"),
            "{tag}: {body}"
        );
        assert!(!s.stored(&d), "{tag} was stored");
    }

    // Over the size limit, nested past any parser's depth, cut off midway.
    s.fake.put_manifest(
        "acme/app",
        Some("huge"),
        OCI_MANIFEST,
        manifest(OCI_MANIFEST),
    );
    s.fake
        .fault(None, "/manifests/huge", FaultKind::Huge(8 << 20), None);
    let deep = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{}},"layers":[],"annotations":{}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_digest =
        s.fake
            .put_manifest("acme/app", Some("deep"), OCI_MANIFEST, deep.into_bytes());
    let cut = s.fake.put_manifest(
        "acme/app",
        Some("cut"),
        OCI_MANIFEST,
        manifest(OCI_MANIFEST),
    );
    s.fake
        .fault(None, "/manifests/cut", FaultKind::Truncate, None);
    // A body cut off is a failed transfer, like an unreachable upstream.
    for (tag, want) in [("huge", 502), ("deep", 502), ("cut", 503)] {
        let (status, _, body) = error_code(
            s.get(&format!("/v2/evil.io/acme/app/manifests/{tag}"), ACCEPT_ALL)
                .await,
        )
        .await;
        assert_eq!(status, want, "{tag}: {body}");
    }
    assert!(!s.stored(&deep_digest) && !s.stored(&cut));
    s.real_pull_works("1", &s.images[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_lists_next_page_goes_to_the_same_upstream() {
    let s = site("").await;
    s.fake
        .put_image("acme/app", "v1", &[bytes::Bytes::from_static(b"l")]);
    let r = s.proxy.get("/v2/acme/app/tags/list?ns=evil.io&n=1").await;
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert!(link.contains("ns=evil.io"), "{link}");
    let next = &link[link.find('<').unwrap() + 1..link.find('>').unwrap()];
    let r = s.proxy.get(next).await;
    assert_eq!(r.status(), 200, "{next}");
    assert_eq!(s.fake.hits("GET", "/v2/acme/app/tags/list"), 2);
    assert!(
        !s.registry.log().contains("/v2/acme/app/tags/list"),
        "page 2 went to docker.io"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_headers_are_read_and_too_many_get_a_registry_error() {
    let s = site("").await;
    let with_headers = |client: &reqwest::Client, n: usize| {
        let mut req = client.get(s.proxy.url("/v2/"));
        for i in 0..n {
            req = req.header(format!("x-h{i}"), "v");
        }
        req
    };
    // 150 headers, about 1.5 KB: an ordinary request.
    let kept = &s.proxy.client;
    assert_eq!(with_headers(kept, 150).send().await.unwrap().status(), 200);
    // 400, each the first request of its connection: a registry error.
    for _ in 0..3 {
        let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
        let r = with_headers(&fresh, 400).send().await.unwrap();
        assert_eq!(r.status(), 431);
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        let (_, code, body) = error_code(r).await;
        assert_eq!(code, "SIZE_INVALID", "{body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("at most 256 headers"),
            "{body}"
        );
    }
    // Later on a kept-alive connection, hyper's own bare 431 (see
    // server/conn.rs for why); counted all the same.
    assert_eq!(with_headers(kept, 400).send().await.unwrap().status(), 431);
    counted(
        &s.proxy,
        "pullgate_requests_total{kind=\"other\",status=\"431\"}",
        4.0,
    )
    .await;
    // A request line that is not HTTP gets a registry error too.
    let mut c = TcpStream::connect(s.proxy.addr).await.unwrap();
    c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("\"code\":\"UNSUPPORTED\""), "{answer}");
    counted(
        &s.proxy,
        "pullgate_requests_total{kind=\"other\",status=\"400\"}",
        1.0,
    )
    .await;
    // A blob whose bytes look like hyper's bare answer is served as it is,
    // on a fresh connection and on a kept-alive one alike.
    let lookalike =
        bytes::Bytes::from_static(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
    let (_, layers) = s
        .fake
        .put_image("acme/odd", "1", std::slice::from_ref(&lookalike));
    let path = format!("/v2/evil.io/acme/odd/blobs/{}", layers[0]);
    for _ in 0..3 {
        let r = s.proxy.get(&path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), lookalike);
    }
    s.real_pull_works("1", &s.images[0]);
}

/// Waits (up to 10 s) for a count made when a connection ends, which can
/// be just after its client has read the answer.
async fn counted(proxy: &Proxy, line: &str, want: f64) {
    let done = eventually(Duration::from_secs(10), || proxy.metric(line) == want).await;
    assert!(done, "{line}: {} instead of {want}", proxy.metric(line));
}

/// Polls `check` every 50 ms for up to `limit`.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_never_block_a_pull() {
    let s = site("header_timeout = \"2s\"").await;
    // 1,000 clients that send half a request head and then nothing.
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut c = TcpStream::connect(s.proxy.addr).await.unwrap();
        c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(c);
    }
    // And 100 that send nothing at all (cut off before HTTP starts: the
    // first bytes decide between HTTP/1.1 and HTTP/2).
    for _ in 0..100 {
        slow.push(TcpStream::connect(s.proxy.addr).await.unwrap());
    }
    // A real pull meanwhile.
    s.real_pull_works("1", &s.images[0]);
    // Every slow client is let go: its connection ends without an answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    for mut c in slow {
        let mut buf = [0u8; 64];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, c.read(&mut buf))
            .await
            .expect("a slow client was never cut off");
        assert!(matches!(n, Ok(0) | Err(_)), "a slow client got an answer");
    }
    assert!(
        s.proxy
            .metric("pullgate_connection_timeouts_total{kind=\"header\"}")
            >= 1100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_limit_get_a_503_and_the_limit_frees_up() {
    let s = site("max_connections = 8").await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(s.proxy.addr).await.unwrap());
    }
    assert!(
        eventually(Duration::from_secs(10), || s
            .proxy
            .metric("pullgate_connections ")
            == 8.0)
        .await,
        "8 connections were never all open"
    );
    let mut over = TcpStream::connect(s.proxy.addr).await.unwrap();
    over.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    over.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("server.max_connections"), "{answer}");
    assert_eq!(s.proxy.metric("pullgate_connections_refused_total"), 1.0);
    drop(idle);
    assert!(
        eventually(Duration::from_secs(10), || s
            .proxy
            .metric("pullgate_connections ")
            == 0.0)
        .await
    );
    s.real_pull_works("1", &s.images[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_let_go() {
    let s = site("send_timeout = \"1s\"").await;
    let blob = common::noise(32 << 20, 5);
    s.fake
        .put_image("acme/big", "1", std::slice::from_ref(&blob));
    let m: serde_json::Value = serde_json::from_slice(
        &s.get("/v2/evil.io/acme/big/manifests/1", ACCEPT_ALL)
            .await
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_owned();
    let path = format!("/v2/evil.io/acme/big/blobs/{layer}");
    assert_eq!(s.proxy.get(&path).await.bytes().await.unwrap(), blob);

    // A client asks for the cached 32 MiB and reads none of it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = socket.connect(s.proxy.addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            s.proxy
                .metric("pullgate_connection_timeouts_total{kind=\"send\"}")
                == 1.0
        })
        .await,
        "the stalled response was never given up"
    );
    // What was already on its way arrives, then the connection ends short.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("the connection was not closed");
    assert!(
        got.len() < blob.len(),
        "the whole blob arrived: {}",
        got.len()
    );
    s.real_pull_works("1", &s.images[0]);
}

#[tokio::test]
async fn the_listener_queues_a_burst_of_connections() {
    let listener = pullgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (Debian package iproute2) lists listening sockets");
    let text = String::from_utf8_lossy(&out.stdout);
    // State, Recv-Q, Send-Q (the backlog), local address, peer.
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listener in ss output: {text:?}"));
    assert!(backlog >= 1024, "backlog {backlog}");
}

/// A small tmpfs, so that the disk really fills (ENOSPC); unmounted on drop.
struct Tmpfs {
    path: std::path::PathBuf,
    sudo: bool,
}

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let sudo = !nix_is_root();
        let mut c = std::process::Command::new(if sudo { "sudo" } else { "mount" });
        if sudo {
            c.args(["-n", "mount"]);
        }
        let out = c
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a {size} tmpfs and could not ({}): run the tests as root, as CI does, or with passwordless sudo",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            path: path.to_path_buf(),
            sudo,
        }
    }
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let mut c = std::process::Command::new(if self.sudo { "sudo" } else { "umount" });
        if self.sudo {
            c.args(["-n", "umount"]);
        }
        let _ = c.arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_breaks_only_the_transfer_that_filled_it_and_caching_resumes() {
    let work = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&work.path().join("disk"), "8m");
    let fake = Fake::start().await;
    let big = common::noise(5 << 20, 77);
    let (_, big_layers) = fake.put_image("acme/big", "1", std::slice::from_ref(&big));
    let small = common::noise(10 << 10, 78);
    let (_, small_layers) = fake.put_image("acme/small", "1", std::slice::from_ref(&small));
    let config = format!(
        "[storage]\npath = \"{}\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
        mnt.path.join("data").display(),
        fake.url()
    );
    let proxy = Proxy::with_config(Arc::new(tempfile::tempdir().unwrap()), &config).await;
    // 5 MiB of the 8 taken by something else: the 5 MiB layer cannot fit.
    let filler = mnt.path.join("filler");
    std::fs::write(&filler, vec![0u8; 5 << 20]).unwrap();
    fake.fault(
        None,
        &big_layers[0],
        FaultKind::Trickle(256 << 10, Duration::from_millis(5)),
        Some(1),
    );
    let path = format!("/v2/acme/big/blobs/{}", big_layers[0]);
    let pulls: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (proxy.client.clone(), proxy.url(&path));
            tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.bytes().await.map(|b| b.len()))
            })
        })
        .collect();
    for p in pulls {
        let (status, body) = p.await.unwrap();
        // A failed answer, or a transfer that breaks: never a short success.
        assert!(
            status != 200 || body.is_err(),
            "a client got {status} with {body:?} bytes"
        );
    }
    assert_eq!(fake.hits("GET", &path), 1, "the clients shared one fetch");
    let data = mnt.path.join("data");
    let hex = &big_layers[0][7..];
    assert!(!data.join("blobs/sha256").join(&hex[..2]).join(hex).exists());
    assert!(
        eventually(Duration::from_secs(10), || {
            std::fs::read_dir(data.join("tmp")).unwrap().count() == 0
        })
        .await,
        "the temp file was not removed"
    );
    assert!(proxy.metric("pullgate_store_write_errors_total{kind=\"no-space\"}") >= 1.0);
    // The space went back: small pulls work while the disk stays nearly full.
    let r = proxy.get("/v2/acme/small/manifests/1").await;
    assert_eq!(r.status(), 200);
    let r = proxy
        .get(&format!("/v2/acme/small/blobs/{}", small_layers[0]))
        .await;
    assert_eq!(r.bytes().await.unwrap(), small);
    // Room again: the big layer is cached with no restart.
    std::fs::remove_file(&filler).unwrap();
    let r = proxy.get(&path).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == big);
    assert!(data.join("blobs/sha256").join(&hex[..2]).join(hex).exists());
    drop(proxy);
}

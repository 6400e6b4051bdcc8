//! Entry points for the fuzz targets in `fuzz/`, one per parser of outside
//! bytes, and for `tests/fuzz_corpus.rs`, which replays every saved input
//! on each test run. Each feeds the bytes to the parsers and checks what
//! must hold of any answer (a range inside the blob, a name that prints as
//! it parsed); a panic anywhere is a finding. Not an API.

use std::path::Path;
use std::sync::LazyLock;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};

use crate::keys::{PrivateKey, PublicKey};
use crate::oci::manifest::Manifest;
use crate::oci::names::{split_image, Digest, Reference, RepoName, Tag};
use crate::pipeline::respond::{self, RangeSpec};
use crate::route::{self, PathKind, Router};
use crate::verify::{bases, cosign};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("request_path", request_path),
    ("names", names),
    ("request_headers", request_headers),
    ("manifest", manifest),
    ("cosign", cosign_formats),
    ("www_authenticate", www_authenticate),
    ("config", config),
    ("response_head", response_head),
    ("upstream", upstream),
    ("bundle", bundle),
    ("bucket", bucket),
];

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A request's path and query: routing, query parameters, and the `Link`
/// rewrite of a tag list answer (the part after a newline is the Link).
pub fn request_path(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let (request, link) = s.split_once('\n').unwrap_or((s, ""));
    let (path, query) = match request.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (request, None),
    };
    for name in ["ns", "n", "last", "artifactType"] {
        let _ = respond::query_param(query, name);
    }
    let Ok(PathKind::Repo { name, target }) = route::parse_path(path) else {
        return;
    };
    let _ = target.kind();
    let router = Router::new([("docker.io", true), ("ghcr.io", false), ("quay.io", false)]);
    let Ok(route) = router.route(&name, respond::query_param(query, "ns")) else {
        return;
    };
    assert!(route.canonical.starts_with(&*route.upstream_name));
    if let Some(l) = respond::rewrite_link(link, &route) {
        // The client is sent to its own name, never to another upstream.
        assert!(
            l.starts_with(&format!("</v2/{}/", route.client_name)),
            "{l}"
        );
        let target = l[1..].split_once('>').map_or(&l[1..], |(t, _)| t);
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let ns: Vec<String> = form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
            .collect();
        let want: Vec<String> = route.ns.iter().map(|n| n.to_string()).collect();
        assert_eq!(ns, want, "{l}");
    }
}

/// Names, tags, digests and references: what parses prints as it parsed.
pub fn names(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d));
    }
    let _ = Digest::from_hex(s);
    if let Ok(n) = s.parse::<RepoName>() {
        assert_eq!(n.to_string(), s);
    }
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.as_str(), s);
        let _ = respond::is_signature_tag(&t);
    }
    if let Ok(r) = Reference::parse(s) {
        assert!(Reference::parse(&r.to_string()).is_ok());
    }
    let _ = split_image(s);
}

/// The request headers pullgate reads: `Range` (against a size taken from
/// the first eight bytes), `Accept` and `Authorization` (each line a
/// value), and the htpasswd file Basic credentials are checked against
/// (the whole text).
pub fn request_headers(data: &[u8]) {
    let (size, rest) = match data.split_first_chunk::<8>() {
        Some((n, rest)) => (u64::from_le_bytes(*n), rest),
        None => return,
    };
    let Some(s) = text(rest) else { return };
    match respond::parse_range(Some(s), size) {
        RangeSpec::Partial(start, end) => assert!(start < end && end <= size, "{s} of {size}"),
        RangeSpec::Full | RangeSpec::Unsatisfiable => {}
    }
    let mut headers = HeaderMap::new();
    for line in s.split('\n') {
        if let Ok(v) = HeaderValue::from_str(line) {
            headers.append(header::ACCEPT, v);
        }
    }
    let _ = crate::content::Accept::Client(&headers).value();
    for line in s.split('\n') {
        let Ok(v) = HeaderValue::from_str(line) else {
            continue;
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, v);
        if let Ok(basic) = crate::auth::basic_credentials(&headers) {
            assert!(!basic.username().is_empty());
        }
    }
    if let Ok(users) = crate::htpasswd::parse(s) {
        for (user, hash) in users {
            assert!(!user.is_empty() && !user.contains(':'), "{user:?}");
            assert_eq!(hash.len(), 60, "{hash:?}");
        }
    }
}

/// A manifest, index or config from an upstream (the first line is its
/// `Content-Type`), and everything read of it afterwards.
pub fn manifest(data: &[u8]) {
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (text(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    let bytes = Bytes::copy_from_slice(body);
    let digest = Digest::of(&bytes);
    let _ = crate::oci::manifest::Platform::from_config(body);
    let Ok(m) = Manifest::parse(digest, content_type, bytes.clone()) else {
        return;
    };
    // What the store reads back is the same manifest.
    let again = Manifest::stored(digest, bytes).expect("a manifest parses again from its bytes");
    assert_eq!(again.media_type, m.media_type);
    let _ = m.referenced_blobs();
    let _ = m.index_children();
    let _ = m.layers();
    let _ = m.platform_manifests();
    let _ = m.config();
    let _ = m.is_index();
    let _ = bases::parse(&m);
    assert!(HeaderValue::from_str(&m.media_type).is_ok());
}

/// Fixed keys of both schemes, for signature checks.
static KEYS: LazyLock<Vec<PublicKey>> = LazyLock::new(|| {
    let ecdsa = p256::ecdsa::SigningKey::from_bytes(&[7u8; 32].into()).expect("a valid scalar");
    let ed = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    [PrivateKey::EcdsaP256(ecdsa), PrivateKey::Ed25519(ed)]
        .iter()
        .map(|k| PublicKey::from_pem(&k.public_pem()).expect("our own key"))
        .collect()
});

/// Cosign's formats: signature manifests and their payloads, sigstore
/// bundles, referrers indexes, and a keyless signature's legacy
/// annotations (from a signature manifest, or the input split at 0xff into
/// certificate, chain, log bundle and signature) turned into a bundle.
pub fn cosign_formats(data: &[u8]) {
    let keys: Vec<&PublicKey> = KEYS.iter().collect();
    let image = Digest::of(b"image");
    if let Ok(layers) = cosign::parse_signature_manifest(data) {
        for layer in &layers {
            let _ = cosign::check(layer, data, &image, &keys);
            if let Some(k) = &layer.keyless {
                legacy_bundle(crate::keyless::LegacySignature {
                    payload: data,
                    signature: &layer.signature,
                    certificate: &k.certificate,
                    chain: k.chain.as_deref(),
                    rekor_bundle: k.rekor_bundle.as_deref().unwrap_or(""),
                });
            }
        }
    }
    let fields: Vec<&str> = data
        .split(|&b| b == 0xff)
        .filter_map(|f| std::str::from_utf8(f).ok())
        .collect();
    if let [certificate, chain, rekor_bundle, signature, ..] = fields[..] {
        legacy_bundle(crate::keyless::LegacySignature {
            payload: data,
            signature,
            certificate,
            chain: Some(chain).filter(|c| !c.is_empty()),
            rekor_bundle,
        });
    }
    let _ = cosign::signed_digest(data);
    let _ = cosign::check_bundle(data, &image, &keys);
    let _ = cosign::is_bundle_manifest(data);
    let _ = cosign::is_signature_artifact(data);
    let _ = cosign::bundle_layer(data);
    let _ = cosign::bundle_referrers(data);
    for k in &keys {
        let _ = k.verify(b"payload", data);
    }
}

/// A bundle made from legacy annotations is JSON that names its format.
fn legacy_bundle(sig: crate::keyless::LegacySignature) {
    if let Ok(json) = crate::keyless::bundle_from_legacy(&sig) {
        let v: serde_json::Value = serde_json::from_str(&json).expect("our own JSON");
        assert!(v["mediaType"].is_string(), "{json}");
    }
}

/// An upstream's `WWW-Authenticate` header and its token realm's answer.
pub fn www_authenticate(data: &[u8]) {
    if let Some(s) = text(data) {
        let _ = crate::remote::registry::parse_challenge(s);
    }
    if let Ok((token, _)) = crate::remote::registry::parse_token(data) {
        assert!(!token.is_empty());
    }
}

/// A config file (files it names are looked for in a directory that does
/// not exist).
pub fn config(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let _ = crate::Config::parse(s, "fuzz.toml", Path::new("/nonexistent/pullgate-fuzz"));
}

/// What the connection writer looks at for hyper's bare answers.
pub fn response_head(data: &[u8]) {
    if let Some((status, bytes)) = crate::server::conn::replacement(data) {
        assert!(status.is_client_error());
        assert!(bytes.starts_with(b"HTTP/1.1 4"));
    }
}

/// A remote that answers from a script: one answer per request, in order
/// (then 404s); or, `down`, one that cannot be reached.
struct Scripted {
    name: std::sync::Arc<str>,
    answers: std::sync::Mutex<std::collections::VecDeque<Answer>>,
    down: bool,
}

struct Answer {
    status: http::StatusCode,
    headers: HeaderMap,
    /// Announced length: the body's, or a lie.
    length: Option<u64>,
    chunks: Vec<Bytes>,
    /// The body breaks after its chunks.
    broken: bool,
}

impl crate::remote::Remote for Scripted {
    fn name(&self) -> &std::sync::Arc<str> {
        &self.name
    }

    fn send<'a>(
        &'a self,
        _req: crate::remote::Request<'a>,
    ) -> futures_util::future::BoxFuture<
        'a,
        Result<crate::remote::Response, crate::remote::RemoteError>,
    > {
        use futures_util::FutureExt;
        if self.down {
            let e = crate::remote::RemoteError::Unreachable {
                upstream: self.name.to_string(),
                message: "fuzzed".into(),
            };
            return futures_util::future::ready(Err(e)).boxed();
        }
        let next = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        async move {
            let Some(a) = next else {
                return Ok(crate::remote::Response {
                    status: http::StatusCode::NOT_FOUND,
                    headers: HeaderMap::new(),
                    content_length: Some(0),
                    body: Box::pin(futures_util::stream::empty()),
                });
            };
            let mut items: Vec<Result<Bytes, crate::remote::BodyError>> =
                a.chunks.into_iter().map(Ok).collect();
            if a.broken {
                items.push(Err(crate::remote::BodyError::Broken("fuzzed".into())));
            }
            Ok(crate::remote::Response {
                status: a.status,
                headers: a.headers,
                content_length: a.length,
                body: Box::pin(futures_util::stream::iter(items)),
            })
        }
        .boxed()
    }
}

/// Reads an answer script: answers separated by a 0xff byte; in each, a first
/// byte choosing the status and quirks, header lines (`Name: value`) up
/// to an empty line, then the body (split into chunks at `\0`).
fn script(data: &[u8]) -> std::collections::VecDeque<Answer> {
    const STATUSES: [u16; 8] = [200, 200, 200, 404, 401, 429, 500, 307];
    let mut out = std::collections::VecDeque::new();
    for part in data.split(|&b| b == 0xff).take(16) {
        let Some((&first, rest)) = part.split_first() else {
            continue;
        };
        let status = http::StatusCode::from_u16(STATUSES[usize::from(first & 7)])
            .unwrap_or(http::StatusCode::OK);
        let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (&b""[..], rest),
        };
        let mut headers = HeaderMap::new();
        for line in head.split(|&b| b == b'\n') {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
            ) {
                headers.append(name, value);
            }
        }
        let len = body.len() as u64;
        let length = match first >> 3 & 3 {
            0 | 1 => Some(len),
            2 => None,
            _ => Some(len.saturating_add(u64::from(first >> 5))),
        };
        out.push_back(Answer {
            status,
            headers,
            length,
            chunks: body
                .split(|&b| b == 0)
                .map(Bytes::copy_from_slice)
                .collect(),
            broken: first & 0x80 != 0 && first & 0x40 != 0,
        });
    }
    out
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

/// What an upstream answers, to every kind of request the content layer
/// makes: a tag, a manifest by digest, a blob (read back whole), a tag list,
/// referrers. Whatever it sends, what the store then holds under a digest
/// hashes to that digest.
pub fn upstream(data: &[u8]) {
    use crate::content::{Accept, Content, Lookup};
    use crate::store::{MemoryStore, Store, TagKey};
    use std::sync::Arc;
    use std::time::Duration;

    // One registry of metrics for every input: building it is most of the
    // cost of a run otherwise.
    static METRICS: LazyLock<Arc<crate::metrics::Metrics>> =
        LazyLock::new(|| Arc::new(crate::metrics::Metrics::new()));
    let store = MemoryStore::new(None, METRICS.clone());
    let content = Content::new(Arc::new(store.clone()), METRICS.clone());
    let remote: Arc<dyn crate::remote::Remote> = Arc::new(Scripted {
        name: Arc::from("fuzz.io"),
        answers: std::sync::Mutex::new(script(data)),
        down: false,
    });
    let repo: RepoName = "acme/app".parse().expect("a valid name");
    let key = TagKey {
        upstream: remote.name().clone(),
        repo: repo.clone(),
        tag: "1".parse().expect("a valid tag"),
    };
    let wanted = Digest::of(data);
    RUNTIME.block_on(async {
        let max = 1 << 20;
        if let Ok(m) = content
            .resolve_tag(&remote, &key, Accept::Any, max, Duration::ZERO)
            .await
        {
            assert_eq!(Digest::of(&m.bytes), m.digest);
        }
        if let Ok(m) = content
            .manifest(&remote, &repo, wanted, Accept::Any, max, Lookup::Client)
            .await
        {
            assert_eq!(m.digest, wanted);
        }
        if let Ok(answer) = content.blob(&remote, &repo, wanted).await {
            if let Some(bytes) = whole_answer(answer, &METRICS).await {
                assert_eq!(
                    Digest::of(&bytes),
                    wanted,
                    "a whole body under another digest"
                );
            }
        }
        if let Some(h) = store.open(&wanted).await.ok().flatten() {
            let bytes = crate::content::read_whole(&h)
                .await
                .expect("a stored blob reads");
            assert_eq!(Digest::of(&bytes), wanted, "stored under another digest");
        }
        let _ = content
            .tag_list(&*remote, &repo, "fuzz.io/acme/app", Some("n=1".into()))
            .await;
        let _ = content.referrers(&*remote, &repo, wanted, None).await;
    });
}

/// A blob answer of the content layer read to its end, as a client would;
/// `None` when the transfer broke.
async fn whole_answer(
    answer: crate::content::BlobAnswer,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
) -> Option<Bytes> {
    match answer {
        crate::content::BlobAnswer::Stored(h) => crate::content::read_whole(&h).await.ok(),
        crate::content::BlobAnswer::Following {
            progress, guard, ..
        } => {
            let reader = crate::content::fetch::BlobReader::following(
                progress,
                0,
                None,
                guard,
                metrics.clone(),
            );
            http_body_util::BodyExt::collect(reader.into_body())
                .await
                .ok()
                .map(|c| c.to_bytes())
        }
    }
}

/// What a shared bucket (`[storage.s3]`) holds, as another replica or
/// whoever else can write to it left it: objects put under the bucket's own
/// layout, then read by a replica through the content layer (an upstream
/// that has nothing), its tag records, approvals and base history, `fsck`
/// and an eviction pass. Whatever the bucket holds, what a replica serves
/// under a digest hashes to it, and after `fsck` every blob left in the
/// bucket hashes to its name.
///
/// Fetch leases are left out: a lease another replica holds is waited on
/// (up to ten minutes) by design, which is no parser of its bytes.
pub fn bucket(data: &[u8]) {
    use crate::content::{Accept, Content, Lookup};
    use crate::store::{Bucket, BucketLimit, FsStore, SharedStore, Store, TagKey};
    use crate::verify::bases::{History, HISTORY_FILE};
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pullgate-fuzz-bucket-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // One registry of metrics for every input, as for `upstream`.
    static METRICS: LazyLock<Arc<crate::metrics::Metrics>> =
        LazyLock::new(|| Arc::new(crate::metrics::Metrics::new()));
    let metrics = METRICS.clone();
    let local = FsStore::open(&dir, None, metrics.clone()).expect("a local tier");
    let shared = SharedStore::new(
        local,
        Bucket::new(
            Arc::new(object_store::memory::InMemory::new()),
            "site",
            "memory://fuzz".into(),
        ),
        Duration::from_secs(3600),
        BucketLimit {
            max_size: Some(1),
            ..BucketLimit::default()
        },
        metrics.clone(),
    );
    let bucket = shared.bucket();
    let repo: RepoName = "acme/app".parse().expect("a valid name");
    let key = TagKey {
        upstream: Arc::from("fuzz.io"),
        repo: repo.clone(),
        tag: "1".parse().expect("a valid tag"),
    };
    // The digest the lying objects are put under.
    let named = Digest::of(b"bucket");
    rt.block_on(async {
        // Objects, separated by 0xff: a first byte choosing where, then the
        // bytes (a raw key first, up to a newline).
        let mut digests = BTreeSet::from([named]);
        for part in data.split(|&b| b == 0xff).take(24) {
            let Some((&first, value)) = part.split_first() else {
                continue;
            };
            let (rel, value) = match first & 7 {
                0 => {
                    let d = Digest::of(value);
                    digests.insert(d);
                    (Bucket::blob_rel(&d), value)
                }
                1 => (Bucket::blob_rel(&named), value),
                2 => (format!("tags/fuzz.io/{}/_tags/1", repo.as_str()), value),
                3 => (
                    format!("approvals/sha256/{}/{first}.json", named.hex()),
                    value,
                ),
                4 => (format!("manifests/sha256/{}", named.hex()), value),
                5 => (format!("evicting/sha256/{}", named.hex()), value),
                6 => (HISTORY_FILE.to_owned(), value),
                _ => {
                    let (k, v) = match value.iter().position(|&b| b == b'\n') {
                        Some(i) => (&value[..i], &value[i + 1..]),
                        None => (value, &b""[..]),
                    };
                    match std::str::from_utf8(k) {
                        Ok(k) if !k.contains("lease") => (k.to_owned(), v),
                        _ => continue,
                    }
                }
            };
            let _ = bucket.write_doc(&rel, value.to_vec()).await;
        }
        let store: Arc<dyn Store> = Arc::new(shared.clone());
        let content = Content::new(store.clone(), metrics.clone());
        // First an upstream that is down (what the bucket holds is served
        // as it is), then one that has nothing (the tag record goes).
        let [down, empty]: [Arc<dyn crate::remote::Remote>; 2] = [true, false].map(|down| {
            Arc::new(Scripted {
                name: key.upstream.clone(),
                answers: std::sync::Mutex::new(Default::default()),
                down,
            }) as Arc<dyn crate::remote::Remote>
        });
        let max = 1 << 20;
        if let Ok(Some(rec)) = store.tag(&key).await {
            digests.insert(rec.digest);
        }
        for remote in [&down, &empty] {
            if let Ok(m) = content
                .resolve_tag(remote, &key, Accept::Any, max, Duration::from_secs(3600))
                .await
            {
                assert_eq!(Digest::of(&m.bytes), m.digest);
            }
        }
        let remote = down;
        for d in &digests {
            if let Ok(m) = content
                .manifest(&remote, &repo, *d, Accept::Any, max, Lookup::Client)
                .await
            {
                assert_eq!(Digest::of(&m.bytes), *d, "a manifest under another digest");
            }
            if let Ok(answer) = content.blob(&remote, &repo, *d).await {
                if let Some(bytes) = whole_answer(answer, &metrics).await {
                    assert_eq!(Digest::of(&bytes), *d, "a blob under another digest");
                }
            }
            if let Ok(Some(h)) = store.open(d).await {
                if let Ok(bytes) = crate::content::read_whole(&h).await {
                    assert_eq!(Digest::of(&bytes), *d, "opened under another digest");
                }
            }
            if let Ok(held) = store.approvals(d).await {
                let keys: Vec<&PublicKey> = KEYS.iter().collect();
                let _ = crate::verify::approvals::check(&held, d, &keys);
            }
        }
        let _ = store.list_tags("fuzz.io", &repo).await;
        if let Ok(Some(bytes)) = store.read_meta(HISTORY_FILE).await {
            if let Ok(h) = History::from_json(&bytes) {
                let again = History::from_json(&h.to_json()).expect("our own JSON");
                assert_eq!(again, h, "base history changed in a round trip");
                History::default().merge(&h, Some(2));
            }
        }
        let _ = shared.evict_pass().await;
        if crate::store::fsck_bucket(bucket, &mut |_| {}).await.is_ok() {
            // What fsck leaves under blobs/ hashes to its name.
            for (rel, _) in bucket.list("blobs/sha256").await.unwrap_or_default() {
                let d = rel
                    .rsplit('/')
                    .next()
                    .and_then(Digest::from_hex)
                    .filter(|d| rel == Bucket::blob_rel(d));
                let Some(d) = d else {
                    panic!("fsck left {rel}, which is not named by a digest");
                };
                if let Ok(Some(bytes)) = bucket.read_blob(&d, max).await {
                    assert_eq!(Digest::of(&bytes), d, "fsck left {rel}");
                }
            }
        }
    });
    drop(shared);
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bundle as `pullgate import` reads it: the tar, its entries, the bundle
/// manifest and signature (keys of both schemes trusted), `index.json`,
/// staged blobs. Whatever it answers, what was staged hashes to its name
/// (the staging store's writer checks that), and an accepted bundle staged
/// every blob it lists.
pub fn bundle(data: &[u8]) {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pullgate-fuzz-bundle-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let tar = dir.join("bundle.tar");
    std::fs::write(&tar, data).expect("a temp file");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let staged = crate::store::FsStore::open(
        &dir.join("staged"),
        None,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    )
    .expect("a staging store");
    let keys: Vec<(String, PublicKey)> = KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("k{i}"), k.clone()))
        .collect();
    for required in [true, false] {
        if let Ok(read) =
            crate::bundle::import::read_tar(&tar, &staged, &keys, required, 1 << 20, rt.handle())
        {
            for b in &read.manifest.blobs {
                use crate::store::Store;
                assert!(
                    staged.has_blob(&b.digest),
                    "an accepted bundle staged {}",
                    b.digest
                );
            }
        }
    }
    drop(staged);
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

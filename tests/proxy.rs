//! pullgate in-process in front of a fake upstream that counts requests and
//! injects faults. Every test runs twice: on the filesystem store (`fs::`)
//! and on the memory store (`memory::`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{error_code, noise, sha, Auth, Fake, FaultKind, Options, Proxy};
use http::Method;
use tokio::sync::Semaphore;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn manifest_by_tag_and_digest_is_fetched_once_then_served_from_cache() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/alpine", "3.20", &[noise(1000, 1)]);
    let proxy = Proxy::start(&fake, Options::default()).await;

    let r = proxy.get("/v2/library/alpine/manifests/3.20").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    let len: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), len);
    assert_eq!(sha(&body), digest);

    // Again by tag, by digest, and HEAD: no more upstream traffic.
    for _ in 0..3 {
        assert_eq!(
            proxy
                .get("/v2/library/alpine/manifests/3.20")
                .await
                .status(),
            200
        );
    }
    let r = proxy
        .get(&format!("/v2/library/alpine/manifests/{digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha(&r.bytes().await.unwrap()), digest);
    let r = proxy
        .client
        .head(proxy.url("/v2/library/alpine/manifests/3.20"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], len.to_string().as_str());
    assert_eq!(fake.hits("GET", "/v2/library/alpine/manifests/3.20"), 1);
    assert_eq!(fake.total_hits("/manifests/"), 1);
    assert_eq!(
        proxy.metric("pullgate_cache_requests_total{kind=\"manifest\",result=\"hit\"}"),
        5.0
    );
}

async fn a_client_accepting_anything_gets_the_manifest() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "v1", &[noise(10, 1)]);
    let proxy = Proxy::start(&fake, Options::default()).await;
    let r = proxy
        .client
        .get(proxy.url("/v2/library/app/manifests/v1"))
        .header("Accept", "*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
}

async fn routing_styles_reach_the_right_upstream_repository() {
    let fake = Fake::start().await;
    let ghcr = Fake::start().await;
    fake.put_image("library/alpine", "1", &[noise(10, 1)]);
    ghcr.put_image("acme/app", "1", &[noise(10, 2)]);
    let opts = Options {
        more_upstreams: format!(
            "[[upstream]]\nname = \"ghcr.io\"\nurl = \"{}\"\n",
            ghcr.url()
        ),
        ..Options::default()
    };
    let proxy = Proxy::start(&fake, opts).await;
    // Default upstream with library/ added, host prefix, and containerd's ns=.
    for path in [
        "/v2/alpine/manifests/1",
        "/v2/docker.io/alpine/manifests/1",
        "/v2/docker.io/library/alpine/manifests/1",
        "/v2/alpine/manifests/1?ns=docker.io",
        "/v2/ghcr.io/acme/app/manifests/1",
        "/v2/acme/app/manifests/1?ns=ghcr.io",
    ] {
        assert_eq!(proxy.get(path).await.status(), 200, "{path}");
    }
    assert_eq!(fake.hits("GET", "/v2/library/alpine/manifests/1"), 1);
    assert_eq!(ghcr.hits("GET", "/v2/acme/app/manifests/1"), 1);
    let (status, code, v) = error_code(proxy.get("/v2/x/manifests/1?ns=quay.io").await).await;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));
    let (status, code, _) = error_code(proxy.get("/v2/quay.io/acme/app/manifests/1").await).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "NAME_UNKNOWN"),
        "an unconfigured registry prefix"
    );
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("docker.io, ghcr.io"));
}

async fn concurrent_cold_blob_requests_cause_exactly_one_upstream_fetch() {
    let fake = Fake::start().await;
    let blob = noise(3 * 1024 * 1024 + 17, 7);
    let digest = fake.put_blob(blob.clone());
    // Hold the body after the first bytes so every client arrives mid-fetch.
    let gate = Arc::new(Semaphore::new(0));
    fake.fault(
        Some(Method::GET),
        &digest,
        FaultKind::GateAfter(4096, gate.clone()),
        Some(1),
    );
    let proxy = Arc::new(Proxy::start(&fake, Options::default()).await);

    let mut clients = Vec::new();
    for _ in 0..32 {
        let proxy = proxy.clone();
        let path = format!("/v2/library/x/blobs/{digest}");
        clients.push(tokio::spawn(async move {
            let mut r = proxy.get(&path).await;
            assert_eq!(r.status(), 200);
            // The first bytes arrive while the upstream is still held.
            let first = r.chunk().await.unwrap().unwrap();
            let mut all = first.to_vec();
            (r, std::mem::take(&mut all))
        }));
    }
    let mut started = Vec::new();
    for c in clients {
        started.push(c.await.unwrap());
    }
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/x/blobs/{digest}")),
        1
    );
    gate.add_permits(1);
    for (mut r, mut got) in started {
        while let Some(c) = r.chunk().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got.len(), blob.len());
        assert!(got == blob, "every client gets the exact bytes");
    }
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/x/blobs/{digest}")),
        1
    );
    // Later requests are store hits.
    let r = proxy.get(&format!("/v2/library/x/blobs/{digest}")).await;
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/x/blobs/{digest}")),
        1
    );
}

async fn a_client_that_disconnects_does_not_stop_the_fetch() {
    let fake = Fake::start().await;
    let blob = noise(2 * 1024 * 1024, 3);
    let digest = fake.put_blob(blob.clone());
    let gate = Arc::new(Semaphore::new(0));
    fake.fault(
        Some(Method::GET),
        &digest,
        FaultKind::GateAfter(1000, gate.clone()),
        Some(1),
    );
    let proxy = Proxy::start(&fake, Options::default()).await;
    let path = format!("/v2/library/x/blobs/{digest}");

    let mut r = proxy.get(&path).await;
    let first = r.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], &blob[..first.len()]);
    drop(r);
    gate.add_permits(1);
    // Wait until the fetch committed.
    let d: pullgate::names::Digest = digest.parse().unwrap();
    for _ in 0..200 {
        if proxy.app.store.has_blob(&d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxy.app.store.has_blob(&d));
    let r = proxy.get(&path).await;
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!(fake.hits("GET", &path), 1);
}

async fn wrong_bytes_abort_every_transfer_and_store_nothing() {
    let fake = Fake::start().await;
    let blob = noise(300_000, 9);
    let digest = fake.put_blob(blob.clone());
    fake.fault(Some(Method::GET), &digest, FaultKind::WrongBytes, Some(1));
    let proxy = Proxy::start(&fake, Options::default()).await;
    let path = format!("/v2/library/x/blobs/{digest}");

    assert!(
        transfer_fails(proxy.get(&path).await).await,
        "the transfer must break, not end cleanly"
    );
    let d: pullgate::names::Digest = digest.parse().unwrap();
    assert!(!proxy.app.store.has_blob(&d));
    assert!(proxy.app.store.open(&d).await.unwrap().is_none());
    assert_eq!(
        proxy.metric("pullgate_digest_mismatches_total{upstream=\"docker.io\"}"),
        1.0
    );
    // The next request fetches again and gets the right bytes.
    let r = proxy.get(&path).await;
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!(fake.hits("GET", &path), 2);
}

async fn truncated_and_stalled_upstream_bodies_fail_cleanly() {
    let fake = Fake::start().await;
    let blob = noise(500_000, 11);
    let digest = fake.put_blob(blob.clone());
    fake.fault(Some(Method::GET), &digest, FaultKind::Truncate, Some(1));
    let opts = Options {
        idle_timeout: "1s".into(),
        ..Options::default()
    };
    let proxy = Proxy::start(&fake, opts).await;
    let path = format!("/v2/library/x/blobs/{digest}");
    assert!(transfer_fails(proxy.get(&path).await).await);

    fake.fault(
        Some(Method::GET),
        &digest,
        FaultKind::StallAfter(100),
        Some(1),
    );
    assert!(
        transfer_fails(proxy.get(&path).await).await,
        "a stalled upstream ends the transfer with an error"
    );

    let d: pullgate::names::Digest = digest.parse().unwrap();
    assert!(!proxy.app.store.has_blob(&d));
    // (A memory store has no temp files; its writers' abort on drop is a
    // unit test of the store.)
    if common::store_kind() == common::StoreKind::Fs {
        let tmp = proxy.dir.path().join("data/tmp");
        assert_eq!(
            std::fs::read_dir(tmp).unwrap().count(),
            0,
            "failed fetches leave no temp files"
        );
    }
    let r = proxy.get(&path).await;
    assert_eq!(r.bytes().await.unwrap(), blob);
}

async fn ranges_are_served_from_cache_and_while_fetching() {
    let fake = Fake::start().await;
    let blob = noise(1_000_000, 5);
    let digest = fake.put_blob(blob.clone());
    let proxy = Proxy::start(&fake, Options::default()).await;
    let path = format!("/v2/library/x/blobs/{digest}");

    // Cold: the range is cut from the fetch as it streams.
    let r = proxy
        .client
        .get(proxy.url(&path))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/1000000");
    assert_eq!(r.bytes().await.unwrap(), blob.slice(100..200));

    let d: pullgate::names::Digest = digest.parse().unwrap();
    for _ in 0..200 {
        if proxy.app.store.has_blob(&d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = proxy
        .client
        .get(proxy.url(&path))
        .header("Range", "bytes=999990-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), blob.slice(999_990..));
    let r = proxy
        .client
        .get(proxy.url(&path))
        .header("Range", "bytes=1000000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000000");
    let r = proxy.client.head(proxy.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000000");
    assert_eq!(fake.hits("GET", &path), 1);
}

async fn an_uncached_blob_head_gives_the_upstreams_length_and_fetches_nothing() {
    let fake = Fake::start().await;
    let blob = noise(123_456, 6);
    let digest = fake.put_blob(blob.clone());
    let proxy = Proxy::start(&fake, Options::default()).await;
    let path = format!("/v2/library/x/blobs/{digest}");
    let r = proxy.client.head(proxy.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "123456");
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(fake.hits("GET", &path), 0);
}

async fn tags_are_revalidated_and_served_stale_when_the_upstream_fails() {
    let fake = Fake::start().await;
    let (d1, _) = fake.put_image("library/app", "v1", &[noise(100, 1)]);
    let opts = Options {
        tag_ttl: "0s".into(),
        ..Options::default()
    };
    let proxy = Proxy::start(&fake, opts).await;
    let path = "/v2/library/app/manifests/v1";
    let digest_of = |r: &reqwest::Response| {
        r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned()
    };

    assert_eq!(digest_of(&proxy.get(path).await), d1);
    // TTL 0: every pull re-checks with a HEAD, without re-downloading.
    assert_eq!(digest_of(&proxy.get(path).await), d1);
    assert_eq!(fake.hits("HEAD", path), 1);
    assert_eq!(fake.hits("GET", path), 1);

    // The upstream errors and rate-limits: the last known digest is served.
    fake.fault(
        Some(Method::HEAD),
        "/manifests/v1",
        FaultKind::Status(503),
        Some(1),
    );
    let r = proxy.get(path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r), d1);
    // (The stale answer defers the next re-check a little; clear that.)
    proxy.app.store.defer_tag(
        &tag_key("library/app", "v1"),
        pullgate::store::TagRecord {
            digest: d1.parse().unwrap(),
            checked: std::time::UNIX_EPOCH,
            approved: None,
        },
        std::time::UNIX_EPOCH,
    );
    fake.fault(
        Some(Method::HEAD),
        "/manifests/v1",
        FaultKind::Status(429),
        Some(1),
    );
    assert_eq!(digest_of(&proxy.get(path).await), d1);
    assert_eq!(
        proxy.metric("pullgate_stale_serves_total{upstream=\"docker.io\"}"),
        2.0
    );

    // The tag moves upstream: the new digest is served.
    proxy.app.store.defer_tag(
        &tag_key("library/app", "v1"),
        pullgate::store::TagRecord {
            digest: d1.parse().unwrap(),
            checked: std::time::UNIX_EPOCH,
            approved: None,
        },
        std::time::UNIX_EPOCH,
    );
    let (d2, _) = fake.put_image("library/app", "v1", &[noise(100, 2)]);
    assert_ne!(d1, d2);
    assert_eq!(digest_of(&proxy.get(path).await), d2);

    // Deleted upstream: 404, not a stale answer.
    fake.state
        .manifests
        .lock()
        .unwrap()
        .remove(&("library/app".into(), "v1".into()));
    let (status, code, _) = error_code(proxy.get(path).await).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
}

/// A failed fetch shows as an error status (when it failed before the
/// answer started) or as a broken body: never as a clean 200.
async fn a_moved_tag_whose_new_manifest_is_unusable_is_served_stale() {
    let fake = Fake::start().await;
    let (d1, _) = fake.put_image("library/app", "v1", &[noise(100, 1)]);
    let opts = Options {
        tag_ttl: "0s".into(),
        ..Options::default()
    };
    let proxy = Proxy::start(&fake, opts).await;
    let path = "/v2/library/app/manifests/v1";
    let r = proxy.get(path).await;
    assert_eq!(r.headers()["docker-content-digest"], d1.as_str());
    // The tag moves, and its new manifest arrives as something that is
    // not a manifest: the last good digest is served, as for a 5xx.
    let (d2, _) = fake.put_image("library/app", "v1", &[noise(100, 2)]);
    assert_ne!(d1, d2);
    fake.fault(
        Some(Method::GET),
        "/manifests/v1",
        FaultKind::NotJson,
        Some(1),
    );
    let r = proxy.get(path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d1.as_str());
    assert_eq!(
        proxy.metric("pullgate_stale_serves_total{upstream=\"docker.io\"}"),
        1.0
    );
}

async fn an_image_never_cached_with_the_upstream_down_says_so() {
    let fake = Fake::start().await;
    let (_, layers) = fake.put_image("library/app", "1", &[noise(100, 1)]);
    let proxy = Proxy::start(&fake, Options::default()).await;
    fake.fault(None, "/v2/", FaultKind::Status(503), None);
    for path in [
        "/v2/library/app/manifests/1".to_owned(),
        format!("/v2/library/app/blobs/{}", layers[0]),
    ] {
        let (status, code, v) = error_code(proxy.get(&path).await).await;
        assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "{v}");
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(
            msg.contains("answered 503") && msg.contains("is not cached here"),
            "{path}: {msg}"
        );
    }
}

async fn transfer_fails(r: reqwest::Response) -> bool {
    if r.status() != 200 {
        return r.status().is_server_error();
    }
    r.bytes().await.is_err()
}

/// Sends a request line as written, without a client normalising the path.
async fn raw_status(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out)
}

fn tag_key(repo: &str, tag: &str) -> pullgate::store::TagKey {
    pullgate::store::TagKey {
        upstream: Arc::from("docker.io"),
        repo: repo.parse().unwrap(),
        tag: tag.parse().unwrap(),
    }
}

async fn a_restarted_proxy_serves_tags_and_blobs_with_the_upstream_gone() {
    let fake = Fake::start().await;
    let (digest, layers) = fake.put_image("library/app", "v1", &[noise(70_000, 4)]);
    let proxy = Proxy::start(&fake, Options::default()).await;
    assert_eq!(
        proxy.get("/v2/library/app/manifests/v1").await.status(),
        200
    );
    let blob = proxy
        .get(&format!("/v2/library/app/blobs/{}", layers[0]))
        .await
        .bytes()
        .await
        .unwrap();
    let dir = proxy.stop().await;

    // The upstream now fails everything.
    fake.fault(None, "/v2/", FaultKind::Status(502), None);
    let opts = Options {
        tag_ttl: "0s".into(),
        ..Options::default()
    };
    let proxy = Proxy::start_in(dir, &fake, opts).await;
    let r = proxy.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    let again = proxy
        .get(&format!("/v2/library/app/blobs/{}", layers[0]))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(again, blob);
}

async fn token_auth_caches_tokens_and_refreshes_them_on_401() {
    let fake = Fake::start().await;
    fake.set_auth(Some(Auth::Token {
        user: "bot".into(),
        pass: "s3cret".into(),
    }));
    fake.put_image("library/a", "1", &[noise(10, 1)]);
    fake.put_image("library/a", "2", &[noise(10, 2)]);
    fake.put_image("library/a", "3", &[noise(10, 3)]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let opts = Options {
        upstream_extra: format!(
            "username = \"bot\"\npassword_file = \"{}\"",
            dir.path().join("pw").display()
        ),
        ..Options::default()
    };
    let proxy = Proxy::start(&fake, opts).await;
    assert_eq!(proxy.get("/v2/library/a/manifests/1").await.status(), 200);
    assert_eq!(proxy.get("/v2/library/a/manifests/2").await.status(), 200);
    assert_eq!(
        fake.state
            .tokens_issued
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one token per scope"
    );
    // The upstream invalidates every token: pullgate gets a new one and retries.
    fake.state
        .token_epoch
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(proxy.get("/v2/library/a/manifests/3").await.status(), 200);
    assert_eq!(
        fake.state
            .tokens_issued
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

async fn wrong_credentials_and_basic_auth() {
    let fake = Fake::start().await;
    fake.set_auth(Some(Auth::Basic {
        user: "u".into(),
        pass: "right".into(),
    }));
    fake.put_image("library/a", "1", &[noise(10, 1)]);
    std::env::set_var("PULLGATE_TEST_PW_RIGHT", "right");
    let ok = Proxy::start(
        &fake,
        Options {
            upstream_extra: "username = \"u\"\npassword_env = \"PULLGATE_TEST_PW_RIGHT\"".into(),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(ok.get("/v2/library/a/manifests/1").await.status(), 200);
    let anonymous = Proxy::start(&fake, Options::default()).await;
    let (status, _, v) = error_code(anonymous.get("/v2/library/a/manifests/1").await).await;
    assert_eq!(status, 503, "{v}");
    assert!(v.to_string().contains("Basic credentials"), "{v}");
}

async fn redirects_to_another_host_get_no_credentials() {
    let fake = Fake::start().await;
    let cdn = Fake::start().await;
    fake.set_auth(Some(Auth::Token {
        user: "bot".into(),
        pass: "pw".into(),
    }));
    let blob = noise(50_000, 8);
    let digest = fake.put_blob(blob.clone());
    cdn.put_blob(blob.clone());
    fake.fault(
        Some(Method::GET),
        &digest,
        FaultKind::RedirectTo(format!("{}/cdn", cdn.url())),
        None,
    );
    std::env::set_var("PULLGATE_TEST_PW_BOT", "pw");
    let proxy = Proxy::start(
        &fake,
        Options {
            upstream_extra: "username = \"bot\"\npassword_env = \"PULLGATE_TEST_PW_BOT\"".into(),
            ..Options::default()
        },
    )
    .await;
    let r = proxy.get(&format!("/v2/library/x/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), blob);
    let seen = cdn.state.seen_auth.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|(_, auth)| auth.is_none()),
        "credentials leaked to the CDN: {seen:?}"
    );
    // And the client's own Authorization is never forwarded upstream.
    let r = proxy
        .client
        .get(proxy.url("/v2/library/y/manifests/1"))
        .header("Authorization", "Bearer client-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let upstream_seen = fake.state.seen_auth.lock().unwrap().clone();
    assert!(upstream_seen
        .iter()
        .all(|(_, a)| a.as_deref() != Some("Bearer client-secret")));
}

async fn bad_requests_get_precise_spec_errors() {
    let fake = Fake::start().await;
    let proxy = Proxy::start(&fake, Options::default()).await;
    let d = sha(b"x");
    for (path, status, code) in [
        ("/v2/UPPER/manifests/1", 400, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:1234", 400, "DIGEST_INVALID"),
        ("/v2/a/manifests/-tag", 400, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        (&format!("/v2/a/blobs/{d}"), 404, "BLOB_UNKNOWN"),
    ] {
        let (s, c, v) = error_code(proxy.get(path).await).await;
        assert_eq!((s, c.as_str()), (status, code), "{path}: {v}");
    }
    for path in [
        "/v2/a/../b/manifests/1",
        "/v2/a%2Fb/manifests/1",
        "/v2/a/./b/manifests/1",
    ] {
        let (status, text) = raw_status(proxy.addr, path).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("NAME_INVALID"), "{text}");
    }
    let long = format!("/v2/{}/manifests/1", vec!["abcdefghijklmnop"; 20].join("/"));
    let (s, c, _) = error_code(proxy.get(&long).await).await;
    assert_eq!((s, c.as_str()), (400, "NAME_INVALID"));
    // Pushes and deletes.
    for (method, path) in [
        (Method::POST, "/v2/a/blobs/uploads/".to_owned()),
        (Method::PUT, "/v2/a/manifests/1".to_owned()),
        (Method::DELETE, format!("/v2/a/manifests/{d}")),
        (Method::PATCH, "/v2/a/blobs/uploads/123".to_owned()),
    ] {
        let r = proxy
            .client
            .request(method.clone(), proxy.url(&path))
            .send()
            .await
            .unwrap();
        let (s, c, _) = error_code(r).await;
        assert_eq!((s, c.as_str()), (405, "UNSUPPORTED"), "{method} {path}");
    }
    // Oversized headers are refused by the server, which keeps serving.
    let r = proxy
        .client
        .get(proxy.url("/v2/"))
        .header("X-Big", "a".repeat(100_000))
        .send()
        .await;
    let status = r.map(|r| r.status().as_u16());
    assert!(matches!(status, Ok(431) | Err(_)), "{status:?}");
    assert_eq!(proxy.get("/v2/").await.status(), 200);
}

async fn bad_manifests_from_upstream_are_refused_and_not_stored() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/a", "1", &[noise(10, 1)]);
    let proxy = Proxy::start(&fake, Options::default()).await;
    fake.fault(
        Some(Method::GET),
        "/manifests/1",
        FaultKind::Huge(5 * 1024 * 1024),
        Some(1),
    );
    let (s, _, v) = error_code(proxy.get("/v2/library/a/manifests/1").await).await;
    assert_eq!(s, 502, "{v}");
    assert!(v.to_string().contains("limit"), "{v}");
    fake.fault(
        Some(Method::GET),
        "/manifests/1",
        FaultKind::NotJson,
        Some(1),
    );
    let (s, _, v) = error_code(proxy.get("/v2/library/a/manifests/1").await).await;
    assert_eq!(s, 502, "{v}");
    fake.fault(
        Some(Method::GET),
        "/manifests/sha256",
        FaultKind::WrongBytes,
        Some(1),
    );
    let (s, _, v) = error_code(
        proxy
            .get(&format!("/v2/library/a/manifests/{digest}"))
            .await,
    )
    .await;
    assert_eq!(s, 502, "{v}");
    let d: pullgate::names::Digest = digest.parse().unwrap();
    assert!(proxy.app.store.manifest(&d).await.unwrap().is_none());
    // Upstream trouble is passed on precisely: 429 keeps its Retry-After.
    fake.fault(
        Some(Method::GET),
        "/manifests/1",
        FaultKind::Status(429),
        Some(1),
    );
    let r = proxy.get("/v2/library/a/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    // And it recovers.
    assert_eq!(proxy.get("/v2/library/a/manifests/1").await.status(), 200);
}

async fn policy_denies_with_spec_json_and_audit_mode_warns() {
    let fake = Fake::start().await;
    let (digest, layers) = fake.put_image("evil/app", "1", &[noise(10, 1)]);
    fake.put_image("watched/app", "1", &[noise(10, 2)]);
    fake.put_image("library/ok", "1", &[noise(10, 3)]);
    let policies = r#"
[[policy]]
name = "blocked"
match = ["docker.io/evil/**"]
deny = true

[[policy]]
name = "watch"
match = ["docker.io/watched/**"]
mode = "audit"
deny = true

[[policy]]
name = "library"
match = ["docker.io/library/*"]
"#;
    let proxy = Proxy::start(
        &fake,
        Options {
            policies: policies.into(),
            ..Options::default()
        },
    )
    .await;
    let (s, code, v) = error_code(proxy.get("/v2/evil/app/manifests/1").await).await;
    assert_eq!((s, code.as_str()), (403, "DENIED"));
    assert_eq!(v["errors"][0]["detail"]["policy"], "blocked");
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "denied-by-policy");
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .starts_with("blocked by policy \"blocked\""));
    let (s, code, _) = error_code(
        proxy
            .get(&format!("/v2/evil/app/blobs/{}", layers[0]))
            .await,
    )
    .await;
    assert_eq!((s, code.as_str()), (403, "DENIED"));
    let (s, _, _) = error_code(proxy.get(&format!("/v2/evil/app/manifests/{digest}")).await).await;
    assert_eq!(s, 403);
    assert_eq!(
        fake.total_hits("/evil/"),
        0,
        "denied names cost no upstream work"
    );

    let r = proxy.get("/v2/watched/app/manifests/1").await;
    assert_eq!(r.status(), 200);
    let w = r.headers()["warning"].to_str().unwrap();
    assert!(w.starts_with("299 - \"pullgate: would block:"), "{w}");

    let (s, _, v) = error_code(proxy.get("/v2/other/app/manifests/1").await).await;
    assert_eq!(s, 403);
    assert_eq!(v["errors"][0]["detail"]["reasons"][0], "no-policy");
    assert_eq!(proxy.get("/v2/library/ok/manifests/1").await.status(), 200);
    let m = proxy.metrics();
    assert!(m.contains("pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"denied-by-policy\",upstream=\"docker.io\"} 2"), "{m}");
    assert!(m.contains("pullgate_blocked_pulls_total{mode=\"audit\",reason=\"denied-by-policy\",upstream=\"docker.io\"} 1"), "{m}");
}

async fn least_recently_used_blobs_are_evicted_beyond_max_size() {
    let fake = Fake::start().await;
    let blobs: Vec<Bytes> = (0..3).map(|i| noise(400_000, 100 + i)).collect();
    let digests: Vec<String> = blobs.iter().map(|b| fake.put_blob(b.clone())).collect();
    let proxy = Proxy::start(
        &fake,
        Options {
            max_size: Some("1MB".into()),
            ..Options::default()
        },
    )
    .await;
    for d in &digests {
        let r = proxy.get(&format!("/v2/library/x/blobs/{d}")).await;
        assert_eq!(r.bytes().await.unwrap().len(), 400_000);
    }
    let in_store: Vec<bool> = digests
        .iter()
        .map(|d| proxy.app.store.has_blob(&d.parse().unwrap()))
        .collect();
    assert_eq!(in_store.iter().filter(|x| **x).count(), 2, "{in_store:?}");
    assert!(proxy.app.store.size() <= 1_000_000);
    // An evicted blob is simply fetched again.
    for d in &digests {
        let r = proxy.get(&format!("/v2/library/x/blobs/{d}")).await;
        assert_eq!(r.bytes().await.unwrap().len(), 400_000);
    }
}

async fn tags_list_and_referrers_pass_through() {
    let fake = Fake::start().await;
    fake.put_image("acme/app", "v1", &[noise(10, 1)]);
    let ghcr_opts = Options {
        more_upstreams: format!(
            "[[upstream]]\nname = \"ghcr.io\"\nurl = \"{}\"\n",
            fake.url()
        ),
        ..Options::default()
    };
    let proxy = Proxy::start(&fake, ghcr_opts).await;
    let r = proxy.get("/v2/ghcr.io/acme/app/tags/list?n=1&last=a").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["link"],
        "</v2/ghcr.io/acme/app/tags/list?last=zzz&n=1>; rel=\"next\""
    );
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["tags"][0], "v1");
    let q = fake.state.seen_query.lock().unwrap().clone();
    assert!(
        q.iter()
            .any(|(p, q)| p == "/v2/acme/app/tags/list" && q == "n=1&last=a"),
        "{q:?}"
    );
    // The upstream fails: the last answer is served (stale-if-error).
    fake.fault(
        Some(Method::GET),
        "/tags/list",
        FaultKind::Status(503),
        Some(1),
    );
    let r = proxy.get("/v2/ghcr.io/acme/app/tags/list?n=1&last=a").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["tags"][0], "v1");
    assert_eq!(
        proxy.metric("pullgate_cache_requests_total{kind=\"tags\",result=\"stale\"}"),
        1.0
    );
    // Never listed before: the error is passed on.
    fake.fault(
        Some(Method::GET),
        "/tags/list",
        FaultKind::Status(503),
        Some(1),
    );
    assert_eq!(
        proxy.get("/v2/ghcr.io/acme/app/tags/list").await.status(),
        503
    );
    let (s, code, _) = error_code(proxy.get("/v2/acme/app/tags/list?n=x").await).await;
    assert_eq!((s, code.as_str()), (400, "PAGINATION_NUMBER_INVALID"));
    // The fake has no referrers API: its 404 is passed on.
    let (s, _, _) = error_code(
        proxy
            .get(&format!("/v2/acme/app/referrers/{}", sha(b"m")))
            .await,
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(fake.total_hits("/referrers/"), 1);
}

async fn cached_blobs_sent_by_sendfile_keep_each_connection_in_step() {
    let fake = Fake::start().await;
    let a = noise(3 * 1024 * 1024 + 1, 21);
    let b = noise(100_000, 22);
    let (da, db) = (fake.put_blob(a.clone()), fake.put_blob(b.clone()));
    fake.put_image("library/app", "v1", &[noise(10, 23)]);
    let proxy = Proxy::start(&fake, Options::default()).await;
    let (pa, pb) = (
        format!("/v2/library/x/blobs/{da}"),
        format!("/v2/library/x/blobs/{db}"),
    );
    // Warm the store; from here on both blobs are store hits.
    assert_eq!(proxy.get(&pa).await.bytes().await.unwrap(), a);
    assert_eq!(proxy.get(&pb).await.bytes().await.unwrap(), b);

    // One keep-alive connection carries blob, manifest, range and HEAD
    // answers in turn; every byte must land where it belongs.
    for _ in 0..3 {
        assert_eq!(proxy.get(&pa).await.bytes().await.unwrap(), a);
        let m = proxy.get("/v2/library/app/manifests/v1").await;
        assert_eq!(m.status(), 200);
        serde_json::from_slice::<serde_json::Value>(&m.bytes().await.unwrap()).unwrap();
        let r = proxy
            .client
            .get(proxy.url(&pb))
            .header("Range", "bytes=10-99")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(r.bytes().await.unwrap(), b.slice(10..100));
        let h = proxy.client.head(proxy.url(&pa)).send().await.unwrap();
        assert_eq!(h.headers()["content-length"], a.len().to_string().as_str());
        assert_eq!(proxy.get(&pb).await.bytes().await.unwrap(), b);
    }
    // A client that hangs up mid-blob disturbs nobody.
    let mut r = proxy.get(&pa).await;
    let _ = r.chunk().await.unwrap();
    drop(r);
    assert_eq!(proxy.get(&pb).await.bytes().await.unwrap(), b);
    assert_eq!(proxy.get(&pa).await.bytes().await.unwrap(), a);
    assert_eq!(fake.hits("GET", &pa), 1);
}

async fn tag_rules_deny_tags_and_require_digests() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/app", "latest", &[noise(10, 1)]);
    fake.put_image("library/app", "1.0", &[noise(10, 2)]);
    fake.put_image("library/app", "2.0-rc1", &[noise(10, 3)]);
    fake.put_image("acme/app", "1.0", &[noise(10, 4)]);
    let policies = r#"
[[policy]]
name = "pinned only"
match = ["docker.io/acme/**"]
require_digest = true

[[policy]]
name = "no moving tags"
match = ["docker.io/library/**"]
deny_tags = ["latest", "*-rc*"]
"#;
    let proxy = Proxy::start(
        &fake,
        Options {
            policies: policies.into(),
            upstream_extra: "aliases = [\"index.docker.io\"]".into(),
            ..Options::default()
        },
    )
    .await;
    for (path, want) in [
        ("/v2/library/app/manifests/latest", 403),
        ("/v2/library/app/manifests/2.0-rc1", 403),
        ("/v2/library/app/manifests/1.0", 200),
        ("/v2/index.docker.io/library/app/manifests/1.0", 200),
        ("/v2/acme/app/manifests/1.0", 403),
    ] {
        let (s, _, v) = error_code(proxy.get(path).await).await;
        assert_eq!(s, want, "{path}: {v}");
        if want == 403 {
            assert_eq!(
                v["errors"][0]["detail"]["reasons"][0], "tag-not-allowed",
                "{path}"
            );
        }
    }
    // By digest: allowed, whatever tags point at it.
    assert_eq!(
        proxy
            .get(&format!("/v2/library/app/manifests/{digest}"))
            .await
            .status(),
        200
    );
    assert_eq!(
        fake.hits("GET", "/v2/library/app/manifests/latest"),
        0,
        "denied tags cost no upstream work"
    );
}

/// Runs each test on both stores.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $(#[tokio::test]
            async fn $name() {
                crate::common::on_store(crate::common::StoreKind::Fs, super::$name()).await
            })*
        }
        mod memory {
            $(#[tokio::test]
            async fn $name() {
                crate::common::on_store(crate::common::StoreKind::Memory, super::$name()).await
            })*
        }
    };
}

on_both_stores!(
    manifest_by_tag_and_digest_is_fetched_once_then_served_from_cache,
    a_client_accepting_anything_gets_the_manifest,
    routing_styles_reach_the_right_upstream_repository,
    concurrent_cold_blob_requests_cause_exactly_one_upstream_fetch,
    a_client_that_disconnects_does_not_stop_the_fetch,
    wrong_bytes_abort_every_transfer_and_store_nothing,
    truncated_and_stalled_upstream_bodies_fail_cleanly,
    ranges_are_served_from_cache_and_while_fetching,
    an_uncached_blob_head_gives_the_upstreams_length_and_fetches_nothing,
    tags_are_revalidated_and_served_stale_when_the_upstream_fails,
    a_moved_tag_whose_new_manifest_is_unusable_is_served_stale,
    an_image_never_cached_with_the_upstream_down_says_so,
    a_restarted_proxy_serves_tags_and_blobs_with_the_upstream_gone,
    token_auth_caches_tokens_and_refreshes_them_on_401,
    wrong_credentials_and_basic_auth,
    redirects_to_another_host_get_no_credentials,
    bad_requests_get_precise_spec_errors,
    bad_manifests_from_upstream_are_refused_and_not_stored,
    policy_denies_with_spec_json_and_audit_mode_warns,
    least_recently_used_blobs_are_evicted_beyond_max_size,
    tags_list_and_referrers_pass_through,
    cached_blobs_sent_by_sendfile_keep_each_connection_in_step,
    tag_rules_deny_tags_and_require_digests,
);

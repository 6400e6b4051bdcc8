//! Metrics, the audit log, the JSON API and the dashboard, checked with the
//! real registry and skopeo, a real headless Chromium and a real Prometheus.

mod common;
mod real;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Proxy;
use real::{pull, push, Layout, Registry, RegistryAuth};

/// A policy name shaped like markup: the page must show it as text.
const HOSTILE_POLICY: &str = "<img src=x onerror=\\\"document.title='pwned'\\\">";

fn config(registry: &Registry, audit: &Path) -> String {
    format!(
        r#"[audit]
path = "{audit}"
approvals = true

[storage]
path = "data"

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[[policy]]
name = "{HOSTILE_POLICY}"
match = ["docker.io/evil/**"]
deny = true

[[policy]]
name = "watch"
match = ["docker.io/watched/**"]
mode = "audit"
deny = true

[[policy]]
name = "library"
match = ["docker.io/library/**"]
"#,
        audit = audit.display(),
        url = registry.url(),
    )
}

/// Pushes one small image under each of `repos` (tag v1).
fn images(w: &Path, registry: &Registry, repos: &[&str]) {
    let mut layout = Layout::new(&w.join("src"));
    let img = layout.image("amd64", &[("f", b"hello\n".to_vec())]);
    layout.tag("v1", &img);
    for repo in repos {
        push(
            w,
            &layout.dir,
            "v1",
            &format!("{}/{repo}:v1", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
}

async fn get_json(client: &reqwest::Client, url: String) -> serde_json::Value {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pulls_show_up_in_metrics_the_audit_log_and_the_api() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    images(w, &registry, &["library/ok", "evil/app", "watched/app"]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let audit = dir.path().join("audit.jsonl");
    let proxy = Proxy::with_config(dir.clone(), &config(&registry, &audit)).await;
    let p = proxy.addr;

    pull(w, &format!("{p}/library/ok:v1"), &w.join("a"), &[]).unwrap();
    let err = pull(w, &format!("{p}/evil/app:v1"), &w.join("b"), &[]).unwrap_err();
    assert!(err.contains("denied"), "{err}");
    pull(w, &format!("{p}/watched/app:v1"), &w.join("c"), &[]).unwrap();

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let metrics = client
        .get(format!("http://{}/metrics", proxy.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"denied-by-policy\",upstream=\"docker.io\"} 1",
        "pullgate_blocked_pulls_total{mode=\"audit\",reason=\"denied-by-policy\",upstream=\"docker.io\"} 1",
        "pullgate_requests_total{kind=\"manifest\",status=\"403\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }
    assert!(
        metrics.contains("pullgate_upstream_requests_total{status=\"200\",upstream=\"docker.io\"}")
    );
    assert!(
        !metrics.contains("evil/app"),
        "no repository names in labels"
    );

    // The audit file: one line per decision, approvals included.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        lines = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["decision"] == "would-deny")
            && lines.iter().any(|l| l["decision"] == "deny")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deny = lines
        .iter()
        .find(|l| l["decision"] == "deny")
        .expect("a deny line");
    assert_eq!(deny["name"], "docker.io/evil/app");
    assert_eq!(deny["reference"], "v1");
    assert_eq!(deny["mode"], "enforce");
    assert_eq!(deny["reasons"][0], "denied-by-policy");
    assert!(deny["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(deny["message"]
        .as_str()
        .unwrap()
        .starts_with("blocked by policy"));
    let would = lines
        .iter()
        .find(|l| l["decision"] == "would-deny")
        .unwrap();
    assert_eq!(would["name"], "docker.io/watched/app");
    assert!(would["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(lines
        .iter()
        .any(|l| l["decision"] == "allow" && l["name"] == "docker.io/library/ok"));

    let api = get_json(
        &client,
        format!("http://{}/api/denials?limit=10", proxy.admin),
    )
    .await;
    let names: Vec<&str> = api["denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["docker.io/watched/app", "docker.io/evil/app"],
        "newest first, approvals not listed"
    );
    let stats = get_json(&client, format!("http://{}/api/stats", proxy.admin)).await;
    assert_eq!(stats["blocked"]["last_hour"], 1);
    assert_eq!(stats["would_block"]["last_hour"], 1);
    assert!(stats["cache"]["misses"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_denials_in_a_real_browser_without_running_their_markup() {
    let chromium = real::require("chromium", "chromium");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    images(w, &registry, &["evil/app", "watched/app", "acme/app"]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // acme/app needs a signature by `k`: denied unsigned, then approved.
    let key = pullgate::keys::PrivateKey::generate("ed25519").unwrap();
    std::fs::write(dir.path().join("k.pub"), key.public_pem()).unwrap();
    let text = format!(
        "[keys]\nk = \"k.pub\"\n{}\n[[policy]]\nname = \"acme\"\nmatch = [\"docker.io/acme/**\"]\nsigned_by = [\"k\"]\n",
        config(&registry, &dir.path().join("audit.jsonl"))
    );
    let proxy = Proxy::with_config(dir.clone(), &text).await;
    let p = proxy.addr;
    let _ = pull(w, &format!("{p}/evil/app:v1"), &w.join("b"), &[]).unwrap_err();
    pull(w, &format!("{p}/watched/app:v1"), &w.join("c"), &[]).unwrap();
    let _ = pull(w, &format!("{p}/acme/app:v1"), &w.join("d"), &[]).unwrap_err();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let denials = get_json(&client, format!("http://{}/api/denials", proxy.admin)).await;
    let acme = denials["denials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "docker.io/acme/app")
        .expect("acme/app was denied")
        .clone();
    let digest: pullgate::names::Digest = acme["digest"].as_str().unwrap().parse().unwrap();
    pullgate::approvals::record(&*proxy.app.store, "docker.io/acme/app", &digest, &key)
        .await
        .unwrap();
    pull(w, &format!("{p}/acme/app:v1"), &w.join("e"), &[]).unwrap();

    let url = format!("http://{}/dashboard", proxy.admin);
    let profile = Arc::new(tempfile::tempdir().unwrap());
    let browse = move |size: &str, extra: &[&str]| {
        let out = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--window-size={size}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("run chromium");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = tokio::task::spawn_blocking({
        let browse = browse.clone();
        move || browse("1280,1000", &["--dump-dom"])
    })
    .await
    .unwrap();
    assert!(
        dom.contains("docker.io/evil/app"),
        "the denied image is listed:\n{dom}"
    );
    assert!(dom.contains("denied-by-policy"), "with its reason:\n{dom}");
    assert!(
        dom.contains("docker.io/watched/app"),
        "audit-mode would-blocks too"
    );
    assert!(
        dom.contains("&lt;img src=x onerror="),
        "markup in data is shown as text:\n{dom}"
    );
    assert!(
        !dom.contains("<img src=\"x\""),
        "markup in data never becomes an element"
    );
    assert!(!dom.contains("<title>pwned"), "no injected script ran");
    // A denial for a missing signature offers the command that lets it
    // through, with the digest; the image, approved since, passes now.
    assert!(
        dom.contains(&format!(
            "pullgate approve docker.io/acme/app@{digest} --key KEY -c CONFIG"
        )),
        "the approve command is offered:\n{dom}"
    );
    assert!(
        dom.contains("passes now"),
        "an approved image is marked:\n{dom}"
    );
    assert!(dom.contains("Time (UTC)"), "times say their zone");
    // Wide and narrow (a phone, a split screen).
    for (size, name) in [
        ("1280,1000", "dashboard.png"),
        ("420,1400", "dashboard-narrow.png"),
    ] {
        let shot = work.path().join(name);
        tokio::task::spawn_blocking({
            let shot = shot.clone();
            let browse = browse.clone();
            move || browse(size, &[&format!("--screenshot={}", shot.display())])
        })
        .await
        .unwrap();
        assert!(
            std::fs::metadata(&shot)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "screenshot taken at {size}"
        );
        eprintln!("dashboard screenshot: {}", shot.display());
        // Kept for a look when PULLGATE_KEEP_SCREENSHOT names a directory.
        if let Ok(keep) = std::env::var("PULLGATE_KEEP_SCREENSHOT") {
            std::fs::copy(&shot, Path::new(&keep).join(name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_the_blocked_pulls_and_the_rules_load() {
    let prometheus = real::require("prometheus", "prometheus");
    let promtool = real::require("promtool", "prometheus");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
    real::run(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(&rules),
    );
    // The store alert's expression, against and without storage.max_size.
    real::run(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/prometheus/rules_test.yml")),
    );

    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    images(w, &registry, &["evil/app"]);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let proxy = Proxy::with_config(
        dir.clone(),
        &config(&registry, &dir.path().join("audit.jsonl")),
    )
    .await;
    let _ = pull(w, &format!("{}/evil/app:v1", proxy.addr), &w.join("b"), &[]).unwrap_err();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = w.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: pullgate\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            proxy.admin
        ),
    )
    .unwrap();
    let mut child = Command::new(&prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", w.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=pullgate_blocked_pulls_total%7Bmode%3D%22enforce%22%7D"
    );
    let mut value = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && value.is_none() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(r) = client.get(&query).send().await else {
            continue;
        };
        let Ok(v) =
            serde_json::from_slice::<serde_json::Value>(&r.bytes().await.unwrap_or_default())
        else {
            continue;
        };
        value = v["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_owned);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        value.as_deref(),
        Some("1"),
        "prometheus log:\n{}",
        std::fs::read_to_string(w.join("prometheus.log")).unwrap_or_default()
    );
}

#[test]
fn every_metric_the_dashboards_and_rules_use_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let known: BTreeSet<&str> = pullgate::metrics::Metrics::new()
        .names
        .into_iter()
        .collect();
    let mut used = BTreeSet::new();
    for file in [
        "deploy/grafana/pullgate.json",
        "deploy/prometheus/rules.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("pullgate_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                .unwrap_or(&name)
                .to_owned();
            used.insert((file, base));
        }
    }
    assert!(
        used.len() >= 5,
        "the dashboards use pullgate metrics: {used:?}"
    );
    for (file, name) in used {
        assert!(
            known.contains(name.as_str()),
            "{file} uses {name}, which pullgate does not export"
        );
    }
}

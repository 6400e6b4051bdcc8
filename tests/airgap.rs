//! The air gap: `pullgate export` from a connected site in front of a real
//! distribution registry, the bundle read by skopeo as an `oci-archive:`,
//! bad bundles refused by `pullgate import`, and the clean one imported
//! into a running air-gapped pullgate (offline upstreams only) and pulled
//! with skopeo and containerd.

mod common;
mod real;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::Proxy;
use real::{assert_same_blobs, noise, pull, push, Containerd, Layout, Registry, RegistryAuth};

fn pullgate(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pullgate"));
    c.args(args)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY");
    c
}

/// Runs a pullgate command; its status code and what it printed.
fn outcome(c: &mut Command) -> (i32, String) {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn import(config: &Path, bundle: &Path, extra: &[&str]) -> (i32, String) {
    let mut c = pullgate(&["import", "--config"]);
    c.arg(config).args(extra).arg(bundle);
    outcome(&mut c)
}

/// One tar entry: its header and bytes.
struct Item {
    header: tar::Header,
    data: Vec<u8>,
}

fn read_items(bundle: &Path) -> Vec<Item> {
    let mut a = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            Item {
                header: e.header().clone(),
                data,
            }
        })
        .collect()
}

fn name(i: &Item) -> String {
    String::from_utf8_lossy(&i.header.path_bytes()).into_owned()
}

/// Writes entries as given: names and types set byte by byte, so entries
/// that the tar crate would refuse to write (`../`, absolute) can be made.
fn write_items(items: &[Item], out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    for i in items {
        let mut h = i.header.clone();
        h.set_size(i.data.len() as u64);
        h.set_cksum();
        b.append(&h, &i.data[..]).unwrap();
    }
    b.finish().unwrap();
}

fn with_name(mut h: tar::Header, name: &str) -> tar::Header {
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name = [0; 100];
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    h
}

/// A bad variant of `bundle`: `f` changes its entries.
fn variant(bundle: &Path, out: &Path, f: impl FnOnce(&mut Vec<Item>)) -> PathBuf {
    let mut items = read_items(bundle);
    f(&mut items);
    write_items(&items, out);
    out.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approved_images_cross_the_air_gap_and_bad_bundles_import_nothing() {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let release = p256::ecdsa::SigningKey::from_slice(&[41; 32]).unwrap();

    // The connected side's images: a signed multi-arch index (legacy
    // signature), an image signed by a cosign v3 bundle (referrers fallback
    // tag), an image the connected site approves locally, an unsigned one.
    let mut layout = Layout::new(&w.join("src"));
    let amd = layout.image(
        "amd64",
        &[
            ("etc/arch", b"amd64\n".to_vec()),
            ("data", noise(3 << 20, 7)),
        ],
    );
    let arm = layout.image("arm64", &[("etc/arch", b"arm64\n".to_vec())]);
    let multi = layout.index(&[("amd64", &amd), ("arm64", &arm)]);
    layout.tag("signed", &multi);
    let sig_tag = real::sign_into(
        &mut layout,
        "docker.io/library/app",
        &multi.digest,
        &release,
    );
    let bundled = layout.image("amd64", &[("etc/os", b"bundled\n".to_vec())]);
    layout.tag("bundled", &bundled);
    let (fallback_tag, fallback_index) =
        real::bundle_into(&mut layout, "docker.io/library/app", &bundled, &release);
    let local = layout.image("amd64", &[("etc/os", b"approved here\n".to_vec())]);
    layout.tag("local", &local);
    let unsigned = layout.image("amd64", &[("etc/os", b"unsigned\n".to_vec())]);
    layout.tag("unsigned", &unsigned);
    for tag in [
        "signed",
        sig_tag.as_str(),
        "bundled",
        "bundle-referrer",
        "local",
        "unsigned",
    ] {
        push(
            w,
            &layout.dir,
            tag,
            &format!("{}/library/app:{tag}", registry.addr),
            &["--dest-tls-verify=false"],
        );
    }
    real::put_index(&registry, "library/app", &fallback_tag, fallback_index).await;

    // Keys: the release key, the connected site's approval key, the export
    // key, and one nobody trusts.
    let keys = w.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(
        keys.join("release.pub"),
        release
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    for k in ["site", "export", "stranger"] {
        let (code, out) = outcome(pullgate(&["keygen", "--out"]).arg(keys.join(k)));
        assert_eq!(code, 0, "{out}");
    }

    // The connected site.
    let connected = w.join("connected.toml");
    std::fs::write(
        &connected,
        format!(
            r#"[storage]
path = "{store}"

[[upstream]]
name = "docker.io"
url = "{url}"
default = true

[keys]
release = "{k}/release.pub"
site = "{k}/site.pub"

[[policy]]
name = "release"
match = ["docker.io/library/**"]
signed_by = ["release", "site"]
"#,
            store = w.join("connected-store").display(),
            url = registry.url(),
            k = keys.display(),
        ),
    )
    .unwrap();
    let (code, out) = outcome(
        pullgate(&[
            "approve",
            &format!("docker.io/library/app@{}", local.digest),
            "--key",
        ])
        .arg(keys.join("site.key"))
        .arg("--config")
        .arg(&connected),
    );
    assert_eq!(code, 0, "{out}");

    // A denied reference fails the export and writes nothing.
    let denied = w.join("denied.tar");
    let (code, out) = outcome(
        pullgate(&["export", "--config"])
            .arg(&connected)
            .arg("--out")
            .arg(&denied)
            .args([
                "docker.io/library/app:signed",
                "docker.io/library/app:unsigned",
            ]),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("docker.io/library/app:unsigned") && out.contains("unsigned"),
        "{out}"
    );
    assert!(!denied.exists() && !w.join("denied.tar.partial").exists());

    // The bundle, signed with the export key.
    let bundle = w.join("bundle.tar");
    let export = |out: &Path, key: &str, refs: &[&str]| {
        let mut c = pullgate(&["export", "--config"]);
        c.arg(&connected)
            .arg("--out")
            .arg(out)
            .arg("--key")
            .arg(keys.join(key))
            .args(refs);
        outcome(&mut c)
    };
    let (code, out) = export(
        &bundle,
        "export.key",
        &[
            "docker.io/library/app:signed",
            "library/app:bundled",
            "app:local",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("exported 3 images") && out.contains("signed"),
        "{out}"
    );
    let items = read_items(&bundle);
    assert_eq!(name(&items[0]), "pullgate-bundle.json");
    assert_eq!(name(&items[1]), "pullgate-bundle.sig");
    let manifest: serde_json::Value = serde_json::from_slice(&items[0].data).unwrap();
    let refs: Vec<&str> = manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["reference"].as_str().unwrap())
        .collect();
    assert!(
        refs.contains(&format!("docker.io/library/app:{sig_tag}").as_str()),
        "{refs:?}"
    );
    assert!(
        refs.contains(&format!("docker.io/library/app:{fallback_tag}").as_str()),
        "{refs:?}"
    );
    // The local approval travels as a cosign signature of its own.
    let local_sig = pullgate::cosign::signature_tag(&local.digest.parse().unwrap());
    assert!(
        refs.contains(&format!("docker.io/library/app:{local_sig}").as_str()),
        "{refs:?}"
    );

    // skopeo reads the bundle as an oci-archive: every platform, every blob.
    let from_archive = w.join("from-archive");
    let mut c = real::skopeo(w);
    c.args(["copy", "--all", "--preserve-digests"])
        .arg(format!(
            "oci-archive:{}:docker.io/library/app:signed",
            bundle.display()
        ))
        .arg(format!("oci:{}:signed", from_archive.display()));
    real::run(&mut c);
    assert_same_blobs(
        &layout,
        &from_archive,
        &[multi.digest.clone(), amd.digest.clone(), arm.digest.clone()],
    );
    assert_same_blobs(&layout, &from_archive, &amd.layers);

    // The air-gapped site: offline upstreams only, bundles signed by the
    // export key, the same release policy.
    let gap_dir = Arc::new(tempfile::tempdir().unwrap());
    let gap_config = |policy_keys: &str| {
        format!(
            r#"[server]
listen = "127.0.0.1:0"

[storage]
path = "{store}"

[[upstream]]
name = "docker.io"
offline = true
default = true

[[upstream]]
name = "registry.k8s.io"
offline = true

[keys]
release = "{k}/release.pub"
site = "{k}/site.pub"
export = "{k}/export.pub"

[bundles]
signed_by = ["export"]

[[policy]]
name = "release"
match = ["docker.io/library/**"]
signed_by = [{policy_keys}]
"#,
            store = gap_dir.path().join("store").display(),
            k = keys.display(),
        )
    };
    let gap_text = gap_config(r#""release", "site""#);
    let gap_file = w.join("gap.toml");
    std::fs::write(&gap_file, &gap_text).unwrap();
    let (code, out) = outcome(pullgate(&["check-config"]).arg(&gap_file));
    assert_eq!(code, 0, "{out}");
    let gap = Proxy::with_config(gap_dir.clone(), &gap_text).await;
    let p = gap.addr;

    // Before any import: a miss says it was never imported.
    let r = gap.get("/v2/library/app/manifests/signed").await;
    let (status, code, body) = common::error_code(r).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"), "{body}");
    assert!(body.to_string().contains("never imported"), "{body}");

    // Bad bundles: each refused with a precise message, nothing visible.
    let bad = w.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let layer = format!("blobs/sha256/{}", &amd.layers[1][7..]);
    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();
    cases.push((
        "tampered blob",
        variant(&bundle, &bad.join("tampered.tar"), |items| {
            let i = items.iter_mut().find(|i| name(i) == layer).unwrap();
            i.data[1000] ^= 1;
        }),
        "tampered",
    ));
    let truncated = bad.join("truncated.tar");
    let bytes = std::fs::read(&bundle).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    cases.push(("truncated tar", truncated, "truncated"));
    cases.push((
        "entry climbing out",
        variant(&bundle, &bad.join("climb.tar"), |items| {
            let h = with_name(items[3].header.clone(), "../../etc/evil");
            items.push(Item {
                header: h,
                data: b"x".to_vec(),
            });
        }),
        "climbs out",
    ));
    cases.push((
        "absolute path",
        variant(&bundle, &bad.join("absolute.tar"), |items| {
            let h = with_name(items[3].header.clone(), "/etc/evil");
            items.push(Item {
                header: h,
                data: b"x".to_vec(),
            });
        }),
        "absolute path",
    ));
    cases.push((
        "symlink",
        variant(&bundle, &bad.join("link.tar"), |items| {
            let i = items.iter_mut().find(|i| name(i) == layer).unwrap();
            i.header.set_entry_type(tar::EntryType::Symlink);
            i.header.set_link_name("/etc/passwd").unwrap();
            i.data.clear();
        }),
        "is a link",
    ));
    cases.push((
        "device",
        variant(&bundle, &bad.join("device.tar"), |items| {
            let i = items.iter_mut().find(|i| name(i) == layer).unwrap();
            i.header.set_entry_type(tar::EntryType::Char);
            i.data.clear();
        }),
        "device",
    ));
    cases.push((
        "duplicate entry",
        variant(&bundle, &bad.join("duplicate.tar"), |items| {
            let i = items.iter().position(|i| name(i) == layer).unwrap();
            let again = Item {
                header: items[i].header.clone(),
                data: items[i].data.clone(),
            };
            items.insert(i + 1, again);
        }),
        "appears twice",
    ));
    cases.push((
        "index.json over the cap",
        variant(&bundle, &bad.join("big-index.tar"), |items| {
            let i = items.iter_mut().find(|i| name(i) == "index.json").unwrap();
            i.data = vec![b' '; 5 << 20];
        }),
        "over the",
    ));
    cases.push((
        "unsigned",
        variant(&bundle, &bad.join("unsigned.tar"), |items| {
            items.remove(1);
        }),
        "not signed",
    ));
    let (code, out) = export(&bad.join("stranger.tar"), "stranger.key", &["app:bundled"]);
    assert_eq!(code, 0, "{out}");
    cases.push((
        "unknown key",
        bad.join("stranger.tar"),
        "does not verify with any key",
    ));
    let (code, out) = export(&bad.join("other.tar"), "export.key", &["app:bundled"]);
    assert_eq!(code, 0, "{out}");
    let other_sig = read_items(&bad.join("other.tar")).remove(1);
    cases.push((
        "swapped signature",
        variant(&bundle, &bad.join("swapped.tar"), |items| {
            items[1] = other_sig;
        }),
        "swapped or replayed",
    ));
    for (what, file, want) in &cases {
        let (code, out) = import(&gap_file, file, &[]);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains(want), "{what}: expected {want:?} in: {out}");
        let r = gap.get("/v2/library/app/manifests/signed").await;
        assert_eq!(r.status(), 404, "{what}: something became visible");
    }
    // Nothing of them is left staged.
    let left: Vec<_> = std::fs::read_dir(gap_dir.path().join("store/imports"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock")
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A site whose policy does not trust the connected site's approvals
    // refuses that image by name, and imports nothing of the bundle.
    let strict_file = w.join("gap-strict.toml");
    std::fs::write(&strict_file, gap_config(r#""release""#)).unwrap();
    let (code, out) = import(&strict_file, &bundle, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("docker.io/library/app:local") && out.contains("denied by this site's policy"),
        "{out}"
    );
    assert!(!out.contains("docker.io/library/app:signed:"), "{out}");

    // The clean bundle: imported, and served at once by the running server.
    let (code, out) = import(&gap_file, &bundle, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("signed by \"export\"") && out.contains("serves them now"),
        "{out}"
    );
    let got = w.join("gap-pull");
    pull(w, &format!("{p}/library/app:signed"), &got, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(
        &layout,
        &got,
        &[multi.digest.clone(), amd.digest.clone(), arm.digest.clone()],
    );
    assert_same_blobs(&layout, &got, &amd.layers);
    for tag in ["bundled", "local"] {
        let out = w.join(format!("gap-{tag}"));
        pull(w, &format!("{p}/library/app:{tag}"), &out, &[])
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
    }
    // The tag list lists what was imported (signature tags too, as a
    // registry would), a page at a time when asked.
    let r = gap.get("/v2/library/app/tags/list").await;
    assert_eq!(r.status(), 200);
    let list: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let tags: Vec<&str> = list["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in [
        "bundled",
        "local",
        "signed",
        sig_tag.as_str(),
        fallback_tag.as_str(),
    ] {
        assert!(tags.contains(&t), "{t} not in {tags:?}");
    }
    assert!(!tags.contains(&"unsigned"), "{tags:?}");
    let r = gap.get("/v2/library/app/tags/list?n=1").await;
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert!(
        link.contains("/v2/library/app/tags/list?n=1&last=bundled"),
        "{link}"
    );
    let page: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(page["tags"], serde_json::json!(["bundled"]));
    // Only what was imported: the unsigned image never crossed.
    let r = gap.get("/v2/library/app/manifests/unsigned").await;
    assert_eq!(r.status(), 404);
    assert_eq!(gap.metric("pullgate_imports_applied_total"), 1.0);

    // containerd pulls the multi-arch image from the air-gapped site.
    let ctrd = Containerd::start(&w.join("ctrd"));
    let hosts = ctrd.hosts_dir("docker.io", &format!("http://{p}"));
    real::run(&mut ctrd.pull("gap", &hosts, "docker.io/library/app:signed"));

    // fsck finds the store consistent.
    let (code, out) = outcome(pullgate(&["fsck", "--config"]).arg(&gap_file));
    assert_eq!(code, 0, "{out}");
    gap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_older_bundle_does_not_move_a_tag_back_unless_allowed() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let v1 = layout.image("amd64", &[("etc/v", b"1\n".to_vec())]);
    let v2 = layout.image("amd64", &[("etc/v", b"2\n".to_vec())]);
    layout.tag("v1", &v1);
    layout.tag("v2", &v2);
    let dest = |tag: &str| format!("{}/library/app:{tag}", registry.addr);
    let tls = ["--dest-tls-verify=false"];
    let connected = w.join("connected.toml");
    std::fs::write(
        &connected,
        format!(
            "[storage]\npath = \"{}\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
            w.join("c-store").display(),
            registry.url()
        ),
    )
    .unwrap();
    let export = |out: &Path| {
        let mut c = pullgate(&["export", "--config"]);
        c.arg(&connected)
            .arg("--out")
            .arg(out)
            .arg("docker.io/library/app:moving");
        let (code, text) = outcome(&mut c);
        assert_eq!(code, 0, "{text}");
    };
    push(w, &layout.dir, "v1", &dest("moving"), &tls);
    export(&w.join("old.tar"));
    // Bundle times are to the second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    push(w, &layout.dir, "v2", &dest("moving"), &tls);
    export(&w.join("new.tar"));

    let gap = w.join("gap.toml");
    std::fs::write(
        &gap,
        format!(
            "[storage]\npath = \"{}\"\n[[upstream]]\nname = \"docker.io\"\noffline = true\ndefault = true\n[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n",
            w.join("g-store").display()
        ),
    )
    .unwrap();
    let (code, out) = import(&gap, &w.join("new.tar"), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no server is running"), "{out}");
    let (code, out) = import(&gap, &w.join("old.tar"), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("would move the tag back") && out.contains(&v2.digest),
        "{out}"
    );
    // Importing the new bundle again changes nothing and is fine.
    let (code, out) = import(&gap, &w.join("new.tar"), &[]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = import(&gap, &w.join("old.tar"), &["--allow-rollback"]);
    assert_eq!(code, 0, "{out}");

    // A server started now serves what the last import set.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let text = std::fs::read_to_string(&gap).unwrap() + "[server]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = Proxy::with_config(dir, &text).await;
    let r = proxy.get("/v2/library/app/manifests/moving").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        v1.digest
    );
    proxy.stop().await;
}

/// Every tag the store at `root` holds for docker.io/library/app names a
/// manifest whose blobs are all in place: no half-visible import.
fn tags_are_whole(root: &Path) -> usize {
    let dir = root.join("tags/docker.io/library/app/_tags");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let blob = |d: &str| root.join("blobs/sha256").join(&d[7..9]).join(&d[7..]);
    let mut whole = 0;
    for e in entries {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
        let mut todo = vec![rec["digest"].as_str().unwrap().to_owned()];
        while let Some(d) = todo.pop() {
            let bytes = std::fs::read(blob(&d))
                .unwrap_or_else(|e| panic!("tag names {d}, not in place: {e}"));
            let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            for c in m["manifests"].as_array().into_iter().flatten() {
                todo.push(c["digest"].as_str().unwrap().to_owned());
            }
            for l in m["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(m.get("config"))
            {
                let ld = l["digest"].as_str().unwrap();
                assert!(blob(ld).exists(), "tag's image lacks blob {ld}");
            }
        }
        whole += 1;
    }
    whole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_any_moment_of_an_import_leaves_nothing_half_visible() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let registry = Registry::start(&w.join("registry"), None, RegistryAuth::None, None);
    let mut layout = Layout::new(&w.join("src"));
    let big = layout.image(
        "amd64",
        &[
            ("a", noise(8 << 20, 1)),
            ("b", noise(8 << 20, 2)),
            ("c", noise(8 << 20, 3)),
        ],
    );
    let small = layout.image("arm64", &[("etc/arch", b"arm64\n".to_vec())]);
    let multi = layout.index(&[("amd64", &big), ("arm64", &small)]);
    layout.tag("multi", &multi);
    push(
        w,
        &layout.dir,
        "multi",
        &format!("{}/library/app:multi", registry.addr),
        &["--dest-tls-verify=false"],
    );
    let policy = "[[policy]]\nname = \"all\"\nmatch = [\"**\"]\n";
    let connected = w.join("connected.toml");
    std::fs::write(
        &connected,
        format!(
            "[storage]\npath = \"{}\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n{policy}",
            w.join("c-store").display(),
            registry.url()
        ),
    )
    .unwrap();
    let bundle = w.join("bundle.tar");
    let (code, out) = outcome(
        pullgate(&["export", "--config"])
            .arg(&connected)
            .arg("--out")
            .arg(&bundle)
            .arg("app:multi"),
    );
    assert_eq!(code, 0, "{out}");

    let gap_config = |store: &Path| {
        let f = store.with_extension("toml");
        std::fs::write(
            &f,
            format!(
                "[storage]\npath = \"{}\"\n[[upstream]]\nname = \"docker.io\"\noffline = true\ndefault = true\n{policy}",
                store.display()
            ),
        )
        .unwrap();
        f
    };
    // How long an import takes here, uninterrupted, into a store that
    // holds its blobs but not its tag: as the rounds below mostly are
    // (each round removes the tag; what an earlier round applied stays).
    // The shortest of three: a run slowed by the tests beside this one
    // would spread the kills past the end of the imports they aim at.
    let scratch = gap_config(&w.join("scratch"));
    let (code, out) = import(&scratch, &bundle, &[]);
    assert_eq!(code, 0, "{out}");
    let mut took = std::time::Duration::MAX;
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(w.join("scratch/tags"));
        let started = std::time::Instant::now();
        let (code, out) = import(&scratch, &bundle, &[]);
        assert_eq!(code, 0, "{out}");
        took = took.min(started.elapsed());
    }

    let store = w.join("gap");
    let config = gap_config(&store);
    let kills = 16;
    let mut killed_running = 0;
    for i in 0..kills {
        let mut child = pullgate(&["import", "--config"])
            .arg(&config)
            .arg(&bundle)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Spread over the import's run, a little past its end.
        std::thread::sleep(took.mul_f64(1.2 * (i as f64 + 0.5) / kills as f64));
        if child.try_wait().unwrap().is_none() {
            killed_running += 1;
        } else {
            // Imports run faster than measured now: aim earlier.
            took = took.mul_f64(0.75);
        }
        child.kill().ok();
        child.wait().unwrap();
        tags_are_whole(&store);
        // Killed before it made the store: nothing there to check.
        if store.join("blobs/sha256").is_dir() {
            let (code, out) = outcome(pullgate(&["fsck", "--config"]).arg(&config));
            assert_eq!(code, 0, "after kill {i}: {out}");
        }
        // Before the next round, the tag goes, so each round starts from
        // nothing visible (an applied import stays applied otherwise).
        let _ = std::fs::remove_dir_all(store.join("tags"));
    }
    assert!(
        killed_running >= kills / 2,
        "only {killed_running} of {kills} kills hit a running import"
    );
    // Whatever the kills left, an import then completes and is whole.
    let (code, out) = import(&config, &bundle, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(tags_are_whole(&store), 1);
    // And a server started on that store serves it.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let text = std::fs::read_to_string(&config).unwrap() + "[server]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = Proxy::with_config(dir, &text).await;
    let out = w.join("pulled");
    pull(w, &format!("{}/library/app:multi", proxy.addr), &out, &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_same_blobs(&layout, &out, &big.layers);
    proxy.stop().await;
}

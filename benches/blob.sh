#!/usr/bin/env bash
# One cached blob to one client over loopback, and nothing else: pullgate,
# distribution and nginx twice (with sendfile, and copying through a
# 256 KiB buffer as pullgate does to a loopback peer), taking turns, each
# round rotated. Throughput from curl's wall time, CPU per GiB as the whole
# machine's busy time (/proc/stat), since on loopback the receiver's kernel
# work falls on whichever process runs. Shorter and steadier than the blob
# part of benches/load.sh: no upstream, no image push, the blob placed in
# each server's storage as it keeps a cached blob.
#
#   benches/blob.sh                     # a 1 GiB blob, 5 rounds of 3 downloads
#   BLOB_MIB=256 ROUNDS=3 benches/blob.sh
#
# Needs docker-registry, nginx-light, curl, python3 (installed when missing)
# and a release build of pullgate (built here).
set -euo pipefail
cd "$(dirname "$0")/.."

BLOB_MIB=${BLOB_MIB:-1024}
ROUNDS=${ROUNDS:-5}
DOWNLOADS=${DOWNLOADS:-3}

. benches/lib.sh
bench_install blob.sh docker-registry:docker-registry nginx:nginx-light curl:curl python3:python3

bench_build blob.sh

bench_work blob.sh
chmod 755 "$WORK" # nginx workers run as an unprivileged user

echo "blob.sh: writing a ${BLOB_MIB} MiB blob"
head -c $((BLOB_MIB << 20)) /dev/urandom > "$WORK/blob"
chmod 644 "$WORK/blob"
HEX=$(sha256sum "$WORK/blob" | cut -c1-64)

# pullgate: the blob where its filesystem store keeps a committed blob.
PG=$(port)
mkdir -p "$WORK/pullgate/blobs/sha256/${HEX:0:2}"
ln "$WORK/blob" "$WORK/pullgate/blobs/sha256/${HEX:0:2}/$HEX"
cat > "$WORK/pullgate.toml" <<TOML
[server]
listen = "127.0.0.1:$PG"
workers = 1
[admin]
listen = "127.0.0.1:$(port)"
[storage]
path = "$WORK/pullgate"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:9"
default = true
[[policy]]
name = "all"
match = ["**"]
TOML
RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate.toml" > "$WORK/pullgate.log" 2>&1 &
PIDS+=($!)

# distribution: a plain registry on its own storage, the blob linked into a
# repository; its proxy mode serves a cached blob through the same code.
DP=$(port)
v2=$WORK/distribution/docker/registry/v2
mkdir -p "$v2/blobs/sha256/${HEX:0:2}/$HEX" "$v2/repositories/bench/app/_layers/sha256/$HEX"
ln "$WORK/blob" "$v2/blobs/sha256/${HEX:0:2}/$HEX/data"
printf 'sha256:%s' "$HEX" > "$v2/repositories/bench/app/_layers/sha256/$HEX/link"
cat > "$WORK/distribution.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/distribution
http:
  addr: 127.0.0.1:$DP
YML
docker-registry serve "$WORK/distribution.yml" > "$WORK/distribution.log" 2>&1 &
PIDS+=($!)

# nginx, one worker each: sendfile as nginx serves static files, and the
# copy through a buffer of pullgate's size.
nginx_on() { # name port directives
  mkdir -p "$WORK/$1/root"
  ln "$WORK/blob" "$WORK/$1/root/blob"
  cat > "$WORK/$1/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
error_log $WORK/$1/error.log;
pid $WORK/$1/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  tcp_nopush on;
  $3
  server { listen 127.0.0.1:$2; root $WORK/$1/root; }
}
NGINX
  nginx -c "$WORK/$1/nginx.conf" &
  PIDS+=($!)
}
NS=$(port); NC=$(port)
nginx_on nginx-sendfile "$NS" "sendfile on;"
nginx_on nginx-copy "$NC" "sendfile off; output_buffers 1 256k;"

declare -A URL=(
  [pullgate]="http://127.0.0.1:$PG/v2/bench/app/blobs/sha256:$HEX"
  [distribution]="http://127.0.0.1:$DP/v2/bench/app/blobs/sha256:$HEX"
  [nginx-sendfile]="http://127.0.0.1:$NS/blob"
  [nginx-copy]="http://127.0.0.1:$NC/blob"
)
NAMES=(pullgate distribution nginx-sendfile nginx-copy)
for _ in $(seq 50); do
  ok=0
  for n in "${NAMES[@]}"; do curl -sfI -o /dev/null "${URL[$n]}" && ok=$((ok + 1)); done
  [ "$ok" -eq ${#NAMES[@]} ] && break
  sleep 0.2
done
cat "$WORK/blob" > /dev/null # in the page cache, as a cached blob is
for n in "${NAMES[@]}"; do
  got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "${URL[$n]}")
  if [ "$got" != "200 $((BLOB_MIB << 20))" ]; then
    echo "blob.sh: $n answered $got, not 200 with the whole blob" >&2
    exit 1
  fi
done

echo "blob.sh: $ROUNDS rounds of $DOWNLOADS downloads per server, rotated"
: > "$WORK/results"
for round in $(seq "$ROUNDS"); do
  for k in $(seq 0 $((${#NAMES[@]} - 1))); do
    n=${NAMES[$(( (round + k) % ${#NAMES[@]} ))]}
    b0=$(machine_busy); t0=$(date +%s.%N)
    for _ in $(seq "$DOWNLOADS"); do curl -sf -o /dev/null "${URL[$n]}"; done
    b1=$(machine_busy); t1=$(date +%s.%N)
    echo "$n $t0 $t1 $((b1 - b0))" >> "$WORK/results"
  done
done

python3 - "$WORK/results" "$BLOB_MIB" "$DOWNLOADS" "$(getconf CLK_TCK)" <<'PY'
import statistics, subprocess, sys, datetime
path, mib, downloads, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = {}
for line in open(path):
    n, t0, t1, ticks = line.split()
    gib = downloads * mib / 1024
    mbps = downloads * mib * 1048576 / 1e6 / (float(t1) - float(t0))
    rows.setdefault(n, []).append((mbps, int(ticks) / hz / gib))
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
print(f"== cached blob, one client ({now}; {cores} cores, {model}; {mib} MiB, medians of {len(next(iter(rows.values())))} rounds of {downloads}) ==")
print(f"{'':16s} {'MB/s':>6s}  {'CPU s/GiB (whole machine)':>25s}   rounds: MB/s")
med = {}
for n, r in rows.items():
    t = statistics.median(x for x, _ in r); c = statistics.median(y for _, y in r)
    med[n] = (t, c)
    print(f"{n:16s} {t:6.0f}  {c:25.3f}   {' '.join(f'{x:.0f}' for x, _ in r)}")
p = med["pullgate"]
fastest = max(med[k][0] for k in med if k != "pullgate")
cheapest = min(med[k][1] for k in med if k != "pullgate")
print("ratios")
print(f"  pullgate / the fastest other, throughput:   {p[0] / fastest:.2f}")
print(f"  pullgate / the cheapest other, CPU per GiB: {p[1] / cheapest:.2f}")
print(f"  pullgate / distribution: throughput {p[0] / med['distribution'][0]:.2f}, CPU per GiB {p[1] / med['distribution'][1]:.2f}")
s, c = med["nginx-sendfile"], med["nginx-copy"]
print(f"  nginx copy / nginx sendfile: throughput {c[0] / s[0]:.2f}, CPU per GiB {c[1] / s[1]:.2f}")
PY
